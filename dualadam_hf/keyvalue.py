"""Settings written as one line of text, ``"k=v,k2=v2"``: ``--optim_args``, the variants of ``dualadam-hf
compare`` and a generated task's ``dataset_config``.

Plain string handling with no dependency, so the optimizer's integration and the experiment harness read
these lines alike and neither needs the other (nor torch) to do it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def parse_pairs(text: str | None, what: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` as ``{"k": "v", "k2": "v2"}`` (values stay text; spaces around keys and values go).

    The one ``key=value`` list reader of the package. ``what`` names the setting in the errors: an entry without
    ``=``, key or value, or a key given twice, is a ValueError.
    """
    pairs: dict[str, str] = {}
    for entry in filter(None, (entry.strip() for entry in (text or "").split(","))):
        key, separator, raw = (part.strip() for part in entry.partition("="))
        if not separator or not key or not raw:
            raise ValueError(f"{what} entry {entry!r} is not of the form key=value")
        if key in pairs:
            raise ValueError(f"{what} gives {key!r} twice")
        pairs[key] = raw
    return pairs


def join_pairs(pairs: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_pairs`: ``"k=v,k2=v2"``, booleans written as true/false."""
    return ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in pairs.items())
