"""Generate 4K images with FLUX.1-dev and the F=16 partitioned VAE (PROTOCOL.md §5).

A command-line tool, not a test:

    python test_flux.py --checkpoint_path ./pretrain/FLUX.1-dev --prompt "..." --height 4096 --width 3072
    python test_flux.py --checkpoint_path outputs/flux-wlf/checkpoint-5000 --prompt "..."

A training checkpoint-N works directly: its transformer/, the other components from the run's base pipeline.
Defaults: 50 steps, guidance 5.0, T5 max_sequence_length 512 (the paper's settings); all flags: --help.
"""
import generation
from errors import exit_on_usage_error


def main(args):
    return generation.main(args)


def parse_args(argv=None):
    """The flags of generation.build_parser with the paper's FLUX.1-dev defaults (models.MODELS["flux"])."""
    return generation.parse_args("flux", argv)


if __name__ == "__main__":
    exit_on_usage_error("test_flux.py", main, parse_args())
