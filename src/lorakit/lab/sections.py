"""docs/lab.md is one page: sections written by separate experiments go in by heading, in one way."""
from __future__ import annotations

from pathlib import Path

TAIL = "## All runs"  # lab-report's closing table: experiment sections go before it


def put_section(lab_md: Path, heading: str, section: str) -> Path:
    """Write `section` (which starts with `heading`) into `lab_md`: in place of an earlier section with that
    heading, else before TAIL, else at the end; a missing lab.md gets the section alone."""
    lab_md.parent.mkdir(parents=True, exist_ok=True)
    section = section.rstrip("\n") + "\n"
    text = lab_md.read_text(encoding="utf-8") if lab_md.is_file() else ""
    if heading in text:
        before, _, after = text.partition(heading)
        rest = after.find("\n## ")
        text = before + section + ("\n" + after[rest + 1:] if rest >= 0 else "")
    elif TAIL in text:
        before, _, after = text.partition(TAIL)
        text = before + section + "\n" + TAIL + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    lab_md.write_text(text, encoding="utf-8")
    return lab_md
