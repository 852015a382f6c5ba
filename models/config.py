"""Typed, validated configuration of the MTL-LoRA adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LAMBDA_TYPES = ("diag", "full")
MIX_INITS = ("kaiming", "random", "uniform")
POOLINGS = ("cls", "mean")

# BERT-family module-name suffixes (BERT, MiniLM, RoBERTa, XLM-R share them): attention
# query/key/value, attention output dense, FFN intermediate dense, FFN output dense.
DEFAULT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every bad field and value."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


@dataclass
class AdapterConfig:
    """Hyper-parameters of the adapters (shared by all adapted layers).

    variant: adapter method, a key of models.adapters.ADAPTERS ("mtl_lora" by default).

    r: rank of the shared low-rank space (A is r x d_in).
    n_up: number of shared up-projections B_i (each d_out x r).
    num_tasks: T, number of tasks (one Λ_t and one w_t per task).
    tau: temperature of softmax(w_t / tau) over the B_i (smaller = sharper). 0.1, the paper's
        commonsense setting.
    alpha: scaling numerator; the update is scaled by alpha / r.
    dropout: dropout on the adapter input x (as in LoRA).
    lambda_type: "diag" (a vector λ_t, the paper's default) or "full" (an r x r matrix).
    mix_init: init of the mixing logits w_t (MoELoRA: of the gate logits).
        "kaiming": uniform on ±1/sqrt(n), as the authors' code (kaiming-uniform, a = sqrt(5),
        on the (T, n) table). With tau 0.1 the tasks start from distinct, sharp blends of the
        B_i, so the B_i get different gradients and grow apart.
        "random": normal with std mix_init_std. "uniform": zeros (every blend 1/n).
        Near-uniform blends (zeros, or a small std at a high tau) give every B_i the same
        gradient: under Adam the B_i then stay equal, and the layer trains as one LoRA with a
        per-task diagonal Λ_t.
    targets: module-name suffixes of the nn.Linear layers to adapt.
    """

    variant: str = "mtl_lora"
    r: int = 8
    n_up: int = 3
    num_tasks: int = 1
    tau: float = 0.1
    alpha: float = 16.0
    dropout: float = 0.0
    lambda_type: str = "diag"
    mix_init: str = "kaiming"
    mix_init_std: float = 0.02
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        errors = self.errors()
        if errors:
            raise ConfigError(errors)

    def errors(self) -> list[str]:
        e = []
        if not isinstance(self.variant, str) or not self.variant:
            e.append(f"variant must be a non-empty string, got {self.variant!r}")
        if not isinstance(self.r, int) or self.r < 1:
            e.append(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.n_up, int) or self.n_up < 1:
            e.append(f"n_up must be an integer >= 1, got {self.n_up!r}")
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            e.append(f"num_tasks must be an integer >= 1, got {self.num_tasks!r}")
        if not _is_number(self.tau) or self.tau <= 0:
            e.append(f"tau must be > 0, got {self.tau!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            e.append(f"alpha must be > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            e.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lambda_type not in LAMBDA_TYPES:
            e.append(f"lambda_type must be one of {LAMBDA_TYPES}, got {self.lambda_type!r}")
        if self.mix_init not in MIX_INITS:
            e.append(f"mix_init must be one of {MIX_INITS}, got {self.mix_init!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            e.append(f"targets must be a non-empty list of module names, got {self.targets!r}")
        return e

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError([f"unknown adapter config field(s): {unknown}"])
        return cls(**d)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The method's own name for the default variant's config.
MTLLoRAConfig = AdapterConfig
