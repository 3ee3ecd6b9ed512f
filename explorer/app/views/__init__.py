"""One Viewer per panel of the app; each renders from the session's ExplorerState."""

from __future__ import annotations

from explorer.app.views.compare import ComparisonView
from explorer.app.views.dataset import DatasetPicker
from explorer.app.views.embedding import EmbeddingView
from explorer.app.views.export import ExportView
from explorer.app.views.genes import GeneBrowser
from explorer.app.views.inspector import CellInspector
from explorer.app.views.phase import PhasePortrait
from explorer.app.views.runner import ModelRunner
from explorer.app.views.timeview import GeneTimeView

__all__ = [
    "CellInspector",
    "ComparisonView",
    "DatasetPicker",
    "EmbeddingView",
    "ExportView",
    "GeneBrowser",
    "GeneTimeView",
    "ModelRunner",
    "PhasePortrait",
]
