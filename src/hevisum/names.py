"""Names read from files (slide ids, spot ids, target names) are data: safe file names, HTML and plot text.

A slide id such as ``../../x`` or ``a/b`` must never become a path outside the output folder, raw HTML, or
matplotlib math. Every place that turns a name into a file name calls :func:`safe_name`; every place that puts
one into HTML calls :func:`html_text`; every place that puts one into a plot calls :func:`plot_text`.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 80


def safe_name(name: object) -> str:
    """A file-name component for ``name``: ASCII letters, digits and ``._+-`` only, never ``.``/``..``, at most
    :data:`MAX_NAME` characters. Names that had to change get a short digest of the original appended, so two
    different names never map to the same file."""
    s = str(name)
    ascii_s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode("ascii")
    clean = _UNSAFE.sub("_", ascii_s).strip("._") or "x"
    if clean == s and len(s) <= MAX_NAME:
        return s
    digest = hashlib.sha1(s.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[: MAX_NAME - 9]}-{digest}"


def html_text(name: object) -> str:
    """``name`` escaped for HTML text and attribute values."""
    return html.escape(str(name), quote=True)


def plot_text(name: object) -> str:
    """``name`` for matplotlib text: every dollar sign escaped, so it is never parsed as math.

    Matplotlib (without usetex) treats text as math only when it holds an even number of unescaped ``$``; once
    every ``$`` is written ``\\$`` none is unescaped, and it draws ``\\$`` as ``$``. Backslashes are drawn as they
    are outside math, so they stay single (doubling them would draw two). Control and other unprintable
    characters (a newline in a slide id) are shown as their escapes (``\\n``), so one name stays one line.
    """
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(name))
    return text.replace("$", r"\$")
