"""Class names and ids: a model's own names (the bundled model carries them), ImageNet's for 1000-class models;
names are matched whole, by first name or by any synonym, case- and underscore-insensitively, with typo hints."""
from __future__ import annotations

from pathlib import Path

from bigr_engine.errors import BigrError

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# Shown when --classes is left out of a 1000-class (ImageNet) model: well-known classes over the range.
IMAGENET_SHOWCASE = [1, 88, 207, 281, 388, 417, 812, 980]


def imagenet_names() -> list[str]:
    """The ImageNet-1k class names in index order, one line per class, synonyms comma-separated."""
    path = ASSETS / "imagenet_classes.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def class_names(model) -> list[str]:
    """Names for the model's classes: its own list if it carries one, ImageNet's for 1000-class models."""
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    return imagenet_names() if model.cfg.num_classes == 1000 else []


def default_classes(model) -> list[int]:
    """A few classes spread over the model's range (well-known ones for ImageNet models)."""
    C = model.cfg.num_classes
    if C == 1000 and not getattr(model, "class_names", None):
        return list(IMAGENET_SHOWCASE)
    return sorted({round(i * (C - 1) / 3) for i in range(4)})


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _class_lookup(names: list[str]):
    """-> three maps name -> set of ids, tried in order: a class's whole line, its first name, any synonym."""
    whole, first, any_syn = {}, {}, {}
    for i, line in enumerate(names):
        syns = [_norm(s) for s in line.split(",") if s.strip()]
        whole.setdefault(_norm(line), set()).add(i)
        if syns:
            first.setdefault(syns[0], set()).add(i)
        for s in syns:
            any_syn.setdefault(s, set()).add(i)
    return whole, first, any_syn


def _name_to_id(part: str, names: list[str], lookup) -> int:
    key = _norm(part)
    for table in lookup:
        ids = table.get(key)
        if ids and len(ids) == 1:
            return next(iter(ids))
        if ids:
            options = ", ".join(f"{i} ({names[i].split(',')[0].strip()})" for i in sorted(ids))
            raise BigrError(f"class name {part!r} is ambiguous: it names classes {options}; pass the id instead")
    short = [n.split(",")[0].strip() for n in names]
    near = [n for n in short if key in _norm(n)][:5]
    if not near:
        import difflib
        near = difflib.get_close_matches(key, [_norm(n) for n in short], n=5, cutoff=0.75)
    if near:
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?"
    elif len(short) <= 20:   # a small model: list them all
        hint = f"; this model's classes are {', '.join(f'{i} {n}' for i, n in enumerate(short))}"
    else:
        hint = f"; pass a class id 0..{len(names) - 1} instead"
    raise BigrError(f"unknown class name {part!r}{hint}")


def resolve_classes(text: str | None, model) -> list[int]:
    """'1,2,tabby' -> ids; None or '' -> `default_classes`. Names match any comma-separated synonym of a
    class, case-insensitively ('_' reads as a space); a name shared by several classes is an error that
    lists them. Entries are separated by commas (or semicolons)."""
    C = model.cfg.num_classes
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return default_classes(model)
    names = class_names(model)
    lookup = _class_lookup(names) if names else None
    ids = []
    for part in parts:
        if part.lstrip("+-").isdigit():
            c = int(part)
            if not 0 <= c < C:
                raise BigrError(f"class id {c} is out of range: this model has classes 0..{C - 1}; pass ids in that range")
        elif names:
            c = _name_to_id(part, names, lookup)
        else:
            raise BigrError(f"unknown class name {part!r}: this model carries no class names; pass ids 0..{C - 1}")
        ids.append(c)
    return ids


def class_ids(labels, model) -> list[int]:
    """A sequence of class ids and/or names (the API's form: ["Sneaker", 3]) -> ids, with the same checks and
    messages as `resolve_classes`; a name may itself contain commas (ImageNet's synonym lines)."""
    names = class_names(model)
    lookup = _class_lookup(names) if names else None
    C = model.cfg.num_classes
    ids = []
    for item in labels:
        if isinstance(item, str) and not item.strip().lstrip("+-").isdigit():
            if not names:
                raise BigrError(f"unknown class name {item!r}: this model carries no class names; pass ids 0..{C - 1}")
            ids.append(_name_to_id(item.strip(), names, lookup))
        else:
            ids.append(int(item))
    return ids
