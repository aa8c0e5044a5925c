"""Folder-name parts that come from the user (-tnp, -enp): checked so they stay inside the output folder."""
from __future__ import annotations

import re

from utils.errors import UserError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def safe_name_part(value: str, flag: str) -> str:
    """`value` if it is a plain name (letters, digits, . _ + = -; no separators, no leading dot)."""
    if not _SAFE.match(value) or ".." in value:
        raise UserError(f"{flag} {value!r} is not a plain name: use letters, digits and . _ + = - only "
                        f"(no '/', no '..'), so results stay inside the output folder")
    return value
