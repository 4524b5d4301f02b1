"""Run several trainkit jobs in one torchrun launch, so a strategy matrix costs one process start.

Usage: torchrun --nproc_per_node=N tests/dist_cases.py cases.json, where cases.json maps a case
name to its list of Hydra overrides. Each case writes metrics.jsonl under its train.output_dir.
"""

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from parallel.mesh import close_world
from trainkit.config import register_schema
from trainkit.spec import build_job_spec
from trainkit.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


def main(cases_file: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        for overrides in cases.values():
            trainer = Trainer(build_job_spec(compose("train", overrides=overrides)))
            trainer.fit()
            trainer.close()
    close_world()


if __name__ == "__main__":
    main(sys.argv[1])
