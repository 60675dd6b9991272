"""The study's main job: every configuration of the sweep axes on a real evaluation set, logged to MLflow.

    python experiments/sweep.py                          # the default configuration on ami_mini
    python experiments/sweep.py -m quant=fp16,int8       # one child run per value, under one parent
    python experiments/sweep.py -m experiment=seed_baseline,seed_plan
    python experiments/sweep.py -m experiment=optuna_search   # multi-objective search (DER, RTFx)
    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1

Axes and their options: conf/ (one group per axis); schema and validation: src/diaropt/config.py.
"""

from __future__ import annotations

from diaropt.quiet import quiet_third_party

quiet_third_party()  # before coremltools is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from diaropt.config import CONF_DIR, register_configs  # noqa: E402
from diaropt.sweep import run_job  # noqa: E402

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    """Run one job; return its ``objectives`` (NaN for a job that did not finish: a sweeper such as
    Optuna then records the trial as failed instead of ranking it)."""
    metrics = run_job(cfg)
    values = tuple(float(metrics.get(name, float("nan"))) for name in cfg.objectives)
    return values[0] if len(values) == 1 else values


if __name__ == "__main__":
    main()
