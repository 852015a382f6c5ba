"""MLflow pyfunc wrappers for registered adrel models (logged as models-from-code).

MLflow refuses to unpickle python models by default, and an ORT session cannot be pickled
anyway, so pipeline.registry logs *this file* as the model's code. MLflow executes it under a
generated module name (`code_model_<hex>`); only then does the last block hand MLflow the model
object. Importing `serving.pyfunc` normally has no side effect.

model_config["kind"] picks the payload:
- "task": one exported task (artifact "model": the export task folder) → serving.scorer.Scorer.
  Input: DataFrame with query, ad_title[, ad_description]. Output: logit, score.
- "checkpoint": the multi-task checkpoint (artifact "model": the checkpoint folder) → PyTorch.
  Input also needs a `task` column. Output: logit, score.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class AdrelModel(PythonModel):
    """Scores query–ad rows with an exported task model or the multi-task checkpoint."""

    def load_context(self, context) -> None:
        cfg = context.model_config or {}
        self.kind = cfg.get("kind", "task")
        path = context.artifacts["model"]
        if self.kind == "task":
            from serving.scorer import Scorer

            self.scorer = Scorer(path, providers=cfg.get("providers", "auto"))
        elif self.kind == "checkpoint":
            from models.checkpoint import load_checkpoint

            self.model, self.cfg = load_checkpoint(path)
            from features.tokenize import PairTokenizer

            self.tokenizer = PairTokenizer(path, max_length=int(self.cfg["max_length"]))
        else:
            raise ValueError(f"unknown adrel model kind {self.kind!r} in model_config")

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("query", "ad_title") if c not in df.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}")
        desc = df["ad_description"].tolist() if "ad_description" in df.columns else None
        q, t = df["query"].astype(str).tolist(), df["ad_title"].astype(str).tolist()
        if self.kind == "task":
            logits = self.scorer.logits(q, t, desc)
        else:
            logits = self._checkpoint_logits(df, q, t, desc)
        score = np.exp(-np.logaddexp(0.0, -logits.astype(np.float64)))
        return pd.DataFrame({"logit": logits.astype(np.float64), "score": score})

    def _checkpoint_logits(self, df, q, t, desc) -> np.ndarray:
        import torch

        if "task" not in df.columns:
            raise ValueError(
                f"the multi-task model needs a task column (one of {self.model.tasks.names})"
            )
        ids = np.array([self.model.tasks.id(str(x)) for x in df["task"]], dtype=np.int64)
        enc = self.tokenizer.encode(q, t, desc)
        with torch.no_grad():
            out = self.model(
                torch.from_numpy(enc["input_ids"]),
                torch.from_numpy(enc["attention_mask"]),
                torch.from_numpy(ids),
                torch.from_numpy(enc["token_type_ids"]),
            )
        return out.float().numpy()


if __name__.startswith("code_model_"):  # executed by MLflow as the model's code file
    import mlflow.models

    mlflow.models.set_model(AdrelModel())
