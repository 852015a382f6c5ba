"""A realistic synthetic ads-relevance data set in the contract layout (the demo's data).

A catalog of products (brand, product type, category, attributes such as colour, material,
audience, size) yields ads (titles and descriptions built from the item) and queries of
several kinds (brand + type, type, attribute + type, category, brand, long tail, with a
share of misspellings). Each query is paired with ads at several distances from what it asks
for, and every pair is judged under four tasks whose rules disagree on the same pairs:

- exact_match: every facet the query states (brand, type, attributes) matches the ad;
  category queries are too vague for it.
- broad_match: the ad is in the category the query implies (its type's category, the
  category named, or the brand's categories); brand and attributes are ignored.
- shopping: the ad's product type is the query's; brand and attributes are ignored, and
  queries without a type (brand, category) have no shopping match.
- brand_protect: like broad match, but when the query names a brand, a competitor's ad is
  irrelevant.

The tasks draw their rows from one shared pool of pairs, so the same (query, ad) pair appears
under several tasks with different labels: one task-blind model cannot fit them all. The rules
depend on words present in the query and the ad (plus which types/brands belong to which
category), so a small encoder can learn them. Labels get a little noise; grades are 0-3.
Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.output import staged_output
from features.schema import TASK_DIR_PREFIX

SYNTH_TASKS = ("exact_match", "broad_match", "shopping", "brand_protect")
# The pool of pairs lives in memory (about 0.5 KB per pair, rows / overlap pairs) and is built
# at about 20k pairs a second: a million rows per task takes about a minute and 1 GB.
MAX_ROWS_PER_TASK = 1_000_000

# ---------------------------------------------------------------------------------------------
# The catalog (invented brands)


@dataclass(frozen=True)
class Category:
    names: tuple[str, ...]  # how queries name the category
    types: tuple[str, ...]
    attrs: dict[str, tuple[str, ...]]
    selling_points: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    "footwear": Category(
        ("footwear", "shoes and boots", "footwear store"),
        ("running shoes", "hiking boots", "sandals", "sneakers", "slippers"),
        {
            "colour": ("black", "white", "red", "blue", "grey", "green"),
            "material": ("leather", "mesh", "suede", "canvas"),
            "audience": ("men's", "women's", "kids'"),
            "size": ("size 7", "size 8", "size 9", "size 10", "size 11"),
        },
        ("Cushioned sole for all-day comfort.", "Grippy rubber outsole.", "Free returns."),
    ),
    "outerwear": Category(
        ("outerwear", "coats and jackets", "outdoor clothing"),
        ("rain jacket", "down parka", "fleece jacket", "windbreaker", "ski jacket"),
        {
            "colour": ("black", "navy", "red", "olive", "yellow", "grey"),
            "material": ("nylon", "polyester", "wool", "recycled fabric"),
            "audience": ("men's", "women's", "kids'"),
            "size": ("small", "medium", "large", "xl"),
        },
        ("Sealed seams keep the rain out.", "Packs into its own pocket.", "Two zip pockets."),
    ),
    "audio": Category(
        ("audio", "headphones and speakers", "audio electronics"),
        ("wireless headphones", "earbuds", "bluetooth speaker", "soundbar", "turntable"),
        {
            "colour": ("black", "white", "silver", "blue", "rose gold"),
            "feature": ("noise cancelling", "waterproof", "bass boost", "long battery"),
        },
        ("Up to 30 hours of playback.", "Pairs in seconds.", "Two-year warranty."),
    ),
    "kitchen": Category(
        ("kitchen", "kitchen appliances", "cookware"),
        ("coffee maker", "blender", "frying pan", "chef knife", "electric kettle"),
        {
            "colour": ("black", "white", "red", "silver", "copper"),
            "material": ("stainless steel", "cast iron", "ceramic", "glass"),
        },
        ("Dishwasher safe.", "Ships in eco packaging.", "Backed by a lifetime guarantee."),
    ),
    "furniture": Category(
        ("furniture", "home furniture", "living room furniture"),
        ("office chair", "standing desk", "bookshelf", "sofa", "bed frame"),
        {
            "colour": ("black", "white", "grey", "beige", "walnut brown"),
            "material": ("oak", "metal", "fabric", "leather", "bamboo"),
        },
        ("Tool-free assembly.", "Free delivery to your room.", "Ten-year frame warranty."),
    ),
    "camping": Category(
        ("camping gear", "outdoor gear", "camping equipment"),
        ("tent", "sleeping bag", "backpack", "camping stove", "hammock"),
        {
            "colour": ("green", "orange", "blue", "grey", "red"),
            "feature": ("ultralight", "waterproof", "insulated", "compact"),
        },
        ("Sets up in minutes.", "Weighs under two kilos.", "Tested in alpine conditions."),
    ),
    "pet": Category(
        ("pet supplies", "pet products", "dog and cat supplies"),
        ("dog bed", "cat tree", "dog leash", "pet carrier", "cat litter box"),
        {
            "colour": ("brown", "grey", "blue", "pink", "black"),
            "size": ("small", "medium", "large"),
            "material": ("plush", "nylon", "wood", "plastic"),
        },
        ("Machine washable.", "Vet recommended.", "Chew resistant."),
    ),
}

# brand -> categories it sells in; brands sharing a category are competitors there.
BRANDS: dict[str, tuple[str, ...]] = {
    "Ridgeline": ("footwear", "outerwear", "camping"),
    "Strideon": ("footwear",),
    "Velora": ("footwear", "outerwear"),
    "Pacemark": ("footwear",),
    "Nordvik": ("outerwear", "camping"),
    "Stormhaven": ("outerwear",),
    "Sonique": ("audio",),
    "Bassline": ("audio",),
    "Auralis": ("audio", "kitchen"),
    "Hearthly": ("kitchen",),
    "Copperleaf": ("kitchen",),
    "Brewster": ("kitchen",),
    "Oakhollow": ("furniture",),
    "Lumbera": ("furniture",),
    "Sittwell": ("furniture", "pet"),
    "Trailcraft": ("camping",),
    "Summitra": ("camping",),
    "Pawsome": ("pet",),
    "Furrow": ("pet",),
    "Kestrel": ("audio", "camping"),
}

TYPE_CATEGORY = {t: c for c, cat in CATEGORIES.items() for t in cat.types}

QUERY_KINDS = (
    "brand_type",
    "type",
    "attr_type",
    "brand_attr_type",
    "category",
    "brand",
    "long_tail",
)
QUERY_KIND_P = (0.20, 0.13, 0.20, 0.10, 0.09, 0.08, 0.20)
MISSPELL_P = 0.12
# Ad relation to the query's anchor product: matches every stated facet, same brand+type but
# other attributes, a competitor's same type, same brand other type, same category, far.
RELATIONS = ("match", "brand_type", "competitor", "brand_other", "category", "far")
RELATION_P = (0.19, 0.11, 0.13, 0.09, 0.08, 0.40)
AD_TEMPLATE_P = (0.3, 0.3, 0.3, 0.1)  # full title, "type by brand", short title, title only
TYPE_FILLERS = ("best", "cheap", "buy", "sale", "deals on", "top rated", "discount")
TAIL_FILLERS = (
    "for everyday use",
    "under 100 dollars",
    "with free shipping",
    "gift idea",
    "for small apartments",
    "that lasts",
    "2024 model",
    "on sale near me",
)


@dataclass(frozen=True)
class Product:
    pid: int
    brand: str
    type: str
    category: str
    attrs: tuple[tuple[str, str], ...]

    def attr(self, key: str) -> str | None:
        return dict(self.attrs).get(key)


@dataclass(frozen=True)
class Intent:
    """What a query asks for (the facets the rules look at)."""

    kind: str
    brand: str | None = None
    type: str | None = None
    category: str | None = None
    attrs: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def categories(self) -> frozenset[str]:
        if self.type:
            return frozenset([TYPE_CATEGORY[self.type]])
        if self.category:
            return frozenset([self.category])
        return frozenset(BRANDS[self.brand]) if self.brand else frozenset()


def build_catalog(rng: np.random.Generator, variants: int = 3) -> list[Product]:
    """Products for every (brand, category, type) with random attribute values."""
    products = []
    for brand in sorted(BRANDS):
        for cname in BRANDS[brand]:
            cat = CATEGORIES[cname]
            for ptype in cat.types:
                seen = set()
                for _ in range(variants):
                    attrs = tuple((k, str(rng.choice(v))) for k, v in cat.attrs.items())
                    if attrs in seen:
                        continue
                    seen.add(attrs)
                    products.append(Product(len(products), brand, ptype, cname, attrs))
    return products


# ---------------------------------------------------------------------------------------------
# Rules


def facets_match(intent: Intent, ad: Product) -> bool:
    return (
        (intent.brand is None or ad.brand == intent.brand)
        and (intent.type is None or ad.type == intent.type)
        and (intent.category is None or ad.category == intent.category)
        and all(ad.attr(k) == v for k, v in intent.attrs)
    )


def rule_label(task: str, intent: Intent, ad: Product) -> int:
    """The noise-free 0/1 relevance of `ad` for `intent` under `task`."""
    in_category = ad.category in intent.categories()
    if task == "exact_match":
        return int(intent.kind != "category" and facets_match(intent, ad))
    if task == "broad_match":
        return int(in_category)
    if task == "shopping":
        return int(intent.type is not None and ad.type == intent.type)
    if task == "brand_protect":
        return int(in_category and (intent.brand is None or ad.brand == intent.brand))
    raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTH_TASKS}")


def rule_grade(label: int, intent: Intent, ad: Product) -> float:
    """0-3: 3 a perfect match, 2 relevant, 1 related (same category) but not relevant, 0 far."""
    if label:
        return 3.0 if facets_match(intent, ad) and intent.kind != "category" else 2.0
    return 1.0 if ad.category in intent.categories() else 0.0


# ---------------------------------------------------------------------------------------------
# Queries and ads


class _Generator:
    """The catalog, its ads and one random stream: every draw goes through `self.rng`."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.products = build_catalog(self.rng)
        self.by_type: dict[str, list[Product]] = {}
        self.by_category: dict[str, list[Product]] = {}
        for p in self.products:
            self.by_type.setdefault(p.type, []).append(p)
            self.by_category.setdefault(p.category, []).append(p)
        self.far = {c: [p for p in self.products if p.category != c] for c in CATEGORIES}
        self.ads = {p.pid: self._ads(p) for p in self.products}

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def query(self, anchor: Product) -> tuple[Intent, str]:
        kind = str(self.rng.choice(QUERY_KINDS, p=QUERY_KIND_P))
        brand, ptype = anchor.brand.lower(), anchor.type
        attrs = list(anchor.attrs)
        if kind == "brand_type":
            intent, text = Intent(kind, anchor.brand, anchor.type), f"{brand} {ptype}"
        elif kind == "type":
            filler = self.pick(TYPE_FILLERS) + " " if self.rng.random() < 0.3 else ""
            intent, text = Intent(kind, type=anchor.type), f"{filler}{ptype}"
        elif kind in ("attr_type", "brand_attr_type"):
            k, v = self.pick(attrs)
            b = anchor.brand if kind == "brand_attr_type" else None
            intent = Intent(kind, b, anchor.type, attrs=((k, v),))
            words = [brand] if b else []
            words += [ptype, v] if k == "size" else [v, ptype]
            text = " ".join(words)
        elif kind == "category":
            filler = (
                " " + self.pick(("deals", "sale", "online", "shop"))
                if self.rng.random() < 0.4
                else ""
            )
            intent = Intent(kind, category=anchor.category)
            text = self.pick(CATEGORIES[anchor.category].names) + filler
        elif kind == "brand":
            suffix = self.pick(("", "", " store", " official", " new collection"))
            intent, text = Intent(kind, brand=anchor.brand), f"{brand}{suffix}"
        else:  # long tail: type + two attributes, sometimes a brand, plus a filler phrase
            idx = self.rng.choice(len(attrs), size=min(2, len(attrs)), replace=False)
            chosen = tuple(attrs[i] for i in sorted(idx))
            b = anchor.brand if self.rng.random() < 0.4 else None
            intent = Intent(kind, b, anchor.type, attrs=chosen)
            words = [v for k, v in chosen if k != "size"] + ([brand] if b else []) + [ptype]
            words += [v for k, v in chosen if k == "size"] + [self.pick(TAIL_FILLERS)]
            text = " ".join(words)
        if self.rng.random() < MISSPELL_P:
            text = self.misspell(text)
        return intent, text

    def misspell(self, text: str) -> str:
        words = text.split(" ")
        long = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if not long:
            return text
        i = self.pick(long)
        w = words[i]
        j = int(self.rng.integers(1, len(w) - 1))
        op = int(self.rng.integers(3))
        if op == 0:  # swap two neighbours
            w = w[: j - 1] + w[j] + w[j - 1] + w[j + 1 :]
        elif op == 1:  # drop a letter
            w = w[:j] + w[j + 1 :]
        else:  # double a letter
            w = w[:j] + w[j] + w[j:]
        words[i] = w
        return " ".join(words)

    def ad_product(self, anchor: Product, intent: Intent) -> Product:
        rel = str(self.rng.choice(RELATIONS, p=RELATION_P))
        same_cat = self.by_category[anchor.category]
        if rel == "match":
            pool = [p for p in self.by_type[anchor.type] if facets_match(intent, p)] or [anchor]
        elif rel == "brand_type":
            pool = [
                p
                for p in self.by_type[anchor.type]
                if p.brand == anchor.brand and p.attrs != anchor.attrs
            ]
        elif rel == "competitor":
            pool = [p for p in self.by_type[anchor.type] if p.brand != anchor.brand]
        elif rel == "brand_other":
            pool = [p for p in same_cat if p.brand == anchor.brand and p.type != anchor.type]
        elif rel == "category":
            pool = [p for p in same_cat if p.brand != anchor.brand and p.type != anchor.type]
        else:
            pool = self.far[anchor.category]
        return self.pick(pool or same_cat)

    def ad_text(self, p: Product) -> tuple[int, str, str | None]:
        """(template id, title, description or None) of one of the product's ads."""
        tpl = int(self.rng.choice(len(AD_TEMPLATE_P), p=AD_TEMPLATE_P))
        return (tpl, *self.ads[p.pid][tpl])

    def _ads(self, p: Product) -> list[tuple[str, str | None]]:
        """The product's ads, one per template; every attribute shows in title or description.

        Fixed per (product, template), so an ad_id always has the same text.
        """
        a = dict(p.attrs)
        brand, ptype = p.brand, _cap(p.type)
        colour = _cap(a.get("colour", ""))
        lead = " ".join(_cap(a[k]) for k in ("audience", "colour", "feature", "material") if k in a)
        full = f"{brand} {lead} {ptype}" + (f" - {_cap(a['size'])}" if "size" in a else "")
        extra = ", ".join(_cap(a[k]) for k in ("material", "feature") if k in a)
        titles = [
            full,
            f"{ptype} by {brand} - {colour}" + (f", {extra}" if extra else ""),
            f"{brand} {ptype} ({colour})",
        ]
        head = " ".join(a[k] for k in ("material", "feature") if k in a)
        who = ""
        if "audience" in a:
            who = " for " + a["audience"].replace("'s", "").replace("'", "")
        desc = f"{head} {p.type}".strip() + f" in {a.get('colour', 'classic')}{who}."
        if "size" in a:
            desc += f" Available in {a['size']}."
        points = CATEGORIES[p.category].selling_points
        ads: list[tuple[str, str | None]] = []
        for title in titles:
            d = f"{desc} {self.pick(points)}"
            ads.append((title, d[0].upper() + d[1:]))
        ads.append((full, None))  # a title-only ad
        return ads


def _cap(text: str) -> str:
    """Title case that leaves "men's" as "Men's" and sizes like "xl" upper case."""
    return " ".join(w.upper() if w in ("xl", "xs") else w[:1].upper() + w[1:] for w in text.split())


def _query_id(text: str) -> str:
    return "q" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclass
class _Pair:
    intent: Intent
    query: str
    product: Product
    tpl: int
    title: str
    description: str | None


def _pool(gen: _Generator, size: int) -> list[_Pair]:
    pairs: list[_Pair] = []
    while len(pairs) < size:
        anchor = gen.pick(gen.products)
        intent, text = gen.query(anchor)
        seen = set()
        for _ in range(int(gen.rng.integers(3, 9))):
            p = gen.ad_product(anchor, intent)
            tpl, title, desc = gen.ad_text(p)
            if (p.pid, tpl) not in seen:  # an ad is shown once per query
                seen.add((p.pid, tpl))
                pairs.append(_Pair(intent, text, p, tpl, title, desc))
    return pairs[:size]


def agreement_stats(labels: dict[str, np.ndarray]) -> dict:
    """How much the tasks disagree on the same pairs (rule labels, before noise).

    disagreement: share of pairs on which not all tasks agree; pairwise: per task pair;
    task_blind_ceiling: best accuracy any model blind to the task can reach on these pairs
    (it must answer the majority label for every pair).
    """
    names = list(labels)
    y = np.stack([labels[t] for t in names])  # (T, N)
    pos = y.sum(axis=0)
    out = {
        "disagreement": float(np.mean((pos > 0) & (pos < len(names)))),
        "pairwise": {
            f"{a}|{b}": float(np.mean(labels[a] != labels[b])) for a, b in combinations(names, 2)
        },
        "task_blind_ceiling": float(np.mean(np.maximum(pos, len(names) - pos) / len(names))),
    }
    return out


def generate(
    out_dir: str | Path,
    rows_per_task: int,
    seed: int,
    tasks: list[str] | tuple[str, ...] | None = None,
    with_labels: bool = True,
    *,
    files_per_task: int = 2,
    noise: float = 0.02,
    with_weight: bool = False,
    overlap: float = 0.67,
    row_group_size: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Write OUT/task=<name>/part-<k>.parquet for each task and return a summary.

    Columns: query_id, query, ad_id, ad_title, ad_description (nullable), then grade (float32,
    0-3) and label (int8) unless `with_labels` is False (a scoring inventory), and weight
    (float32, head queries 2.0, others 1.0) with `with_weight`. Each task draws
    `rows_per_task` rows (at most MAX_ROWS_PER_TASK) from a shared pool of about
    rows_per_task / overlap pairs, so two tasks share about `overlap` of their pairs. `noise`
    is the per-task label flip rate. An OUT that is not empty is refused unless `overwrite`
    (then the old data set is replaced whole); OUT is written in one piece or not at all
    (features.output.staged_output).
    """
    tasks = tuple(tasks) if tasks else SYNTH_TASKS
    unknown = [t for t in tasks if t not in SYNTH_TASKS]
    errors = [f"unknown synthetic task(s) {unknown}; known: {list(SYNTH_TASKS)}"] if unknown else []
    if len(set(tasks)) != len(tasks):
        errors.append(f"duplicate tasks in {list(tasks)}")
    if not isinstance(rows_per_task, int) or not 1 <= rows_per_task <= MAX_ROWS_PER_TASK:
        errors.append(
            f"rows_per_task must be an integer in [1, {MAX_ROWS_PER_TASK}], got {rows_per_task!r}"
        )
    if not 0.0 <= noise < 0.5:
        errors.append(f"noise must be in [0, 0.5), got {noise!r}")
    if not 0.0 < overlap <= 1.0:
        errors.append(f"overlap must be in (0, 1], got {overlap!r}")
    if not isinstance(files_per_task, int) or files_per_task < 1:
        errors.append(f"files_per_task must be an integer >= 1, got {files_per_task!r}")
    if errors:
        raise ValueError("; ".join(errors))

    out = Path(out_dir)
    with staged_output(out.resolve(), overwrite, _is_task_dir, "a synthetic data set") as staging:
        gen = _Generator(seed)
        pool = _pool(gen, max(rows_per_task, int(round(rows_per_task / overlap))))
        rule = {
            t: np.array([rule_label(t, p.intent, p.product) for p in pool], np.int8) for t in tasks
        }
        summary: dict = {"out_dir": str(out), "seed": seed, "pool_pairs": len(pool), "tasks": {}}
        for task in tasks:
            idx = np.sort(gen.rng.choice(len(pool), size=rows_per_task, replace=False))
            labels = rule[task][idx].copy()
            flip = gen.rng.random(rows_per_task) < noise
            labels[flip] = 1 - labels[flip]
            table = _task_table([pool[i] for i in idx], labels, flip, with_labels, with_weight)
            task_dir = f"{TASK_DIR_PREFIX}{task}"
            files = _write_task(staging / task_dir, table, files_per_task, row_group_size)
            summary["tasks"][task] = {
                "rows": rows_per_task,
                "positive_rate": float(labels.mean()),
                "flipped": int(flip.sum()),
                "files": [str(out / task_dir / f.name) for f in files],
            }
    if len(tasks) > 1:
        summary.update(agreement_stats(rule))
    return summary


def _is_task_dir(name: str) -> bool:
    return name.startswith(TASK_DIR_PREFIX)


def _task_table(
    pairs: list[_Pair],
    labels: np.ndarray,
    flipped: np.ndarray,
    with_labels: bool,
    with_weight: bool,
) -> pa.Table:
    cols = {
        "query_id": pa.array([_query_id(p.query) for p in pairs], pa.string()),
        "query": pa.array([p.query for p in pairs], pa.string()),
        "ad_id": pa.array([f"p{p.product.pid:04d}t{p.tpl}" for p in pairs], pa.string()),
        "ad_title": pa.array([p.title for p in pairs], pa.string()),
        "ad_description": pa.array([p.description for p in pairs], pa.string()),
    }
    if with_labels:
        grades = []
        for p, y, f in zip(pairs, labels, flipped):
            g = rule_grade(int(y), p.intent, p.product)
            grades.append((2.0 if y else 1.0) if f else g)
        cols["grade"] = pa.array(grades, pa.float32())
        cols["label"] = pa.array(labels, pa.int8())
    if with_weight:
        head = {"brand_type", "type", "category", "brand"}
        cols["weight"] = pa.array(
            [2.0 if p.intent.kind in head else 1.0 for p in pairs], pa.float32()
        )
    return pa.table(cols)


def _write_task(task_dir: Path, table: pa.Table, n_files: int, row_group_size: int) -> list[Path]:
    task_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, n_files + 1).astype(int)
    paths = []
    for k in range(n_files):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        path = task_dir / f"part-{k}.parquet"
        pq.write_table(part, path, row_group_size=row_group_size, compression="snappy")
        paths.append(path)
    return paths
