"""MkDocs hook: the spec reference page, generated from ``oi_ray/config/schema.py`` at build time.

Each section of ``ExperimentConfig`` becomes a table of its dotted keys, types and defaults; a
field's documentation is its comment in the schema (on its line, or the comment lines just above
it), and a field documented as ``a <StrEnum>`` lists that enum's values. The page cannot drift
from the schema: it is the schema, read again on every ``mkdocs build``.
"""

import dataclasses
import enum
import inspect
import io
import re
import tokenize
import typing
from typing import Any

from oi_ray.config import schema

MARKER = "<!-- spec-reference -->"
PAGE = "reference.md"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the reference page's marker with the generated tables."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} has lost its {MARKER} marker")
    return markdown.replace(MARKER, reference())


def reference() -> str:
    """Markdown tables of every spec key, one per top-level section."""
    comments = _field_comments()
    top, sections = [], []
    for item in dataclasses.fields(schema.ExperimentConfig):
        if dataclasses.is_dataclass(_field_type(schema.ExperimentConfig, item)):
            sections.append(f"## `{item.name}`\n\n{_doc(_field_type(schema.ExperimentConfig, item))}"
                            f"| key | type | default | meaning |\n|---|---|---|---|\n"
                            + "".join(_rows(_field_type(schema.ExperimentConfig, item), item.name, comments)))
        else:
            top.append(_row(schema.ExperimentConfig, item, item.name, comments))
    header = "## Top level\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
    return header + "".join(top) + "\n" + "\n".join(sections)


def _rows(config: type, prefix: str, comments: dict) -> list[str]:
    rows = []
    for item in dataclasses.fields(config):
        kind = _field_type(config, item)
        if dataclasses.is_dataclass(kind):
            rows += _rows(kind, f"{prefix}.{item.name}", comments)
        else:
            rows.append(_row(config, item, f"{prefix}.{item.name}", comments))
    return rows


def _row(config: type, item: dataclasses.Field, key: str, comments: dict) -> str:
    comment = comments.get((config.__name__, item.name), "")
    choice = _choice_enum(comment)
    if choice is not None:  # "a ModelType" in the schema: the enum's values here
        rest = re.sub(rf"\ban? {choice.__name__}\b[.:,;]?", "", comment).strip(" ,;:")
        rest = re.sub(r"\s+", " ", rest)
        values = ", ".join(f"`{member.value}`" for member in choice)
        comment = f"{rest}; one of {values}" if rest else f"one of {values}"
    meaning = comment.replace("|", "\\|")
    return f"| `{key}` | {_type_name(_field_type(config, item))} | {_default(item)} | {meaning} |\n"


def _choice_enum(comment: str) -> type[enum.StrEnum] | None:
    """The schema's StrEnum a comment names as ``a <Enum>``, if any."""
    words = [word.strip(",;:.()") for word in comment.split()]
    for article, word in zip(words, words[1:], strict=False):
        member = getattr(schema, word, None)
        if article in ("a", "an") and isinstance(member, type) and issubclass(member, enum.StrEnum):
            return member
    return None


def _doc(config: type) -> str:
    doc = inspect.getdoc(config)
    own = doc and not doc.startswith(f"{config.__name__}(")  # dataclasses write a signature as the doc
    return f"{doc}\n\n" if own else ""


def _field_type(config: type, item: dataclasses.Field) -> Any:
    return typing.get_type_hints(config)[item.name]


def _type_name(kind: Any) -> str:
    text = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
    return f"`{text}`".replace("|", "\\|")


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`".replace("|", "\\|") if not isinstance(value, str) else f"`{value}`"


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's comment in the schema's source."""
    source = inspect.getsource(schema)
    comments_by_line = {token.start[0]: token.string.lstrip("#").strip()
                        for token in tokenize.generate_tokens(io.StringIO(source).readline)
                        if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    found, owner = {}, None
    for number, line in enumerate(lines, start=1):
        if line.startswith("class "):
            owner = line[len("class "):].split("(")[0].split(":")[0]
            continue
        stripped = line.strip()
        if owner and line.startswith("    ") and not stripped.startswith("#") and ":" in stripped \
                and stripped.split(":")[0].isidentifier():
            name = stripped.split(":")[0]
            above, previous = [], number - 1
            while previous in comments_by_line and lines[previous - 1].strip().startswith("#"):
                above.insert(0, comments_by_line[previous])
                previous -= 1
            parts = [*above, comments_by_line.get(number, "")]
            found[(owner, name)] = " ".join(part for part in parts if part)
    return found
