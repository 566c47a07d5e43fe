"""MkDocs hook: the configuration reference, generated from dpl's registries where a page asks for it.

A page that holds the line ``<!-- dpl:reference -->`` gets there every group, option and key with its
default and documentation (:func:`dpl.config.docs.reference`); a key without documentation fails the build.
"""

from __future__ import annotations

MARKER = "<!-- dpl:reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from dpl.config.docs import reference

    return markdown.replace(MARKER, reference())
