"""A griffe extension for the API reference: robalign's docstrings are written for Sphinx-style
readers (``:class:`~robalign.DoRALoss```, ``::`` before a literal block); mkdocstrings renders
Markdown, so the roles become code spans (the name as the role would show it) and a ``::``
paragraph ending becomes a colon. The docstrings themselves are left as they are."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    text = ROLE.sub(_role, text)
    text = re.sub(r"^(\s*)::\s*$", "", text, flags=re.M)          # a lone "::" line
    return re.sub(r"(\S)::\s*$", r"\1:", text, flags=re.M)        # "text::" ends a paragraph


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
