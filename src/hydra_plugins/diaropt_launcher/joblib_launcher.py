"""``hydra/launcher=joblib`` for diaropt: parallel jobs, each in its own worker process (:mod:`diaropt.launcher`).

Kept import-light: Hydra imports every ``hydra_plugins`` module when it starts.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ProcessPerJobLauncher(Launcher):
    """At most ``n_jobs`` jobs at once (joblib's meaning: -1 every CPU), each in a loky worker of its
    own, so one worker's death fails one job instead of the sweep (see :mod:`diaropt.launcher`)."""

    def __init__(self, n_jobs: int = -1, **joblib_options: Any) -> None:
        from diaropt.launcher import check_joblib_options

        check_joblib_options(joblib_options)
        self.n_jobs = n_jobs
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from diaropt.launcher import launch

        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        return launch(self.config, self.hydra_context, self.task_function, self.n_jobs, job_overrides,
                      initial_job_idx)
