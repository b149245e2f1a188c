"""kritarc: enable the Krita plug-in without disturbing the rest, and undo exactly that."""

from __future__ import annotations

from pathlib import Path

from installer.files import missing_dirs, remove_empty
from installer.layout import PLUGIN

KRITA_KEY = f"enable_{PLUGIN}"
KRITA_SECTION = "[python]"


def section_span(lines: list[str]) -> tuple[int, int] | None:
    start = next((i for i, line in enumerate(lines) if line.strip() == KRITA_SECTION), None)
    if start is None:
        return None
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines)
    )
    return start, end


def key_line(lines: list[str], start: int, end: int) -> int | None:
    return next(
        (i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == KRITA_KEY), None
    )


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def enable_text(text: str) -> tuple[str, dict]:
    """kritarc text with the plug-in enabled, and a record of how to undo exactly that."""
    nl = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    record = {"previous": None, "added_section": False, "blank_before": False}
    record["added_newline"] = bool(text) and not text.endswith(("\n", "\r"))
    if record["added_newline"]:
        lines[-1] += nl
    entry = f"{KRITA_KEY}=true"
    sec = section_span(lines)
    if sec is None:
        record["added_section"] = True
        record["blank_before"] = any(line.strip() for line in lines)
        lines += [nl] * record["blank_before"] + [KRITA_SECTION + nl, entry + nl]
    elif (i := key_line(lines, *sec)) is not None:
        record["previous"] = lines[i].rstrip("\r\n")
        lines[i] = entry + _ending(lines[i])
    else:
        lines.insert(sec[0] + 1, entry + nl)
    return "".join(lines), record


def disable_text(text: str, record: dict) -> str:
    """Undo `enable_text`: the plug-in's line (or its earlier value) and what was added for it."""
    lines = text.splitlines(keepends=True)
    sec = section_span(lines)
    if sec is not None:
        start, end = sec
        i = key_line(lines, start, end)
        if i is not None and record.get("previous") is not None:
            lines[i] = record["previous"] + _ending(lines[i])
        elif i is not None:
            del lines[i]
            end -= 1
        if record.get("added_section") and not any(x.strip() for x in lines[start + 1 : end]):
            del lines[start:end]
            if record.get("blank_before") and start > 0 and not lines[start - 1].strip():
                del lines[start - 1]
    result = "".join(lines)
    if record.get("added_newline"):
        result = result.rstrip("\r\n") if result.endswith(("\n", "\r")) else result
    return result


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def enable_in_kritarc(path: Path, old: dict | None) -> dict:
    """Enable the plug-in in the kritarc at `path`; returns the record that undoes it (`old`, an
    earlier install's record, on an update)."""
    created = not path.exists()
    parents = [str(p) for p in missing_dirs(path.parent)]
    text, record = enable_text("" if created else _read_text(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, text)
    if old and old.get("path") == str(path):
        return old  # an update: keep what the first install found there
    return {"path": str(path), "created_file": created, "parents": parents, **record}


def disable_in_kritarc(record: dict) -> None:
    path = Path(record["path"])
    if not path.is_file():
        return
    text = disable_text(_read_text(path), record)
    if record.get("created_file") and not text.strip():
        path.unlink()
        remove_empty(record.get("parents", []))
    else:
        _write_text(path, text)
