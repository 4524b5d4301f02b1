"""Run a trainkit config on this machine, a multi-GPU node, several nodes or Slurm: ``python -m launch``.

``launch.cli`` checks the config against the world it will run in, then runs torchrun's elastic agent
in its own process; ``launch.slurm`` writes the sbatch script; ``launch.export`` turns a checkpoint
into an HF folder.
"""
