"""The ``deploy`` section of a study spec lives in :mod:`mpq.options` (shared by the search
application and the lowering); re-exported here for the lowering's callers."""

from __future__ import annotations

from mpq.options import DEPLOY_TARGETS, DeploySpec, DeployTarget

__all__ = ["DEPLOY_TARGETS", "DeploySpec", "DeployTarget"]
