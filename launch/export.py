"""``python -m launch.export CHECKPOINT OUT``: a checkpoint's model as an HF folder (safetensors +
config.json + tokenizer), from DCP (any torch strategy and world size) or DeepSpeed ZeRO alike."""

import argparse
import sys

from trainkit.checkpoint import export_checkpoint
from trainkit.config import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split(":")[0])
    parser.add_argument("checkpoint", help="a complete <output_dir>/checkpoints/step_<N> folder")
    parser.add_argument("out", help="the HF folder to write")
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out))
    except ConfigError as err:
        print(f"trainkit: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
