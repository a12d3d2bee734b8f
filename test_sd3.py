"""Generate 4K images with Stable Diffusion 3 and the F=16 partitioned VAE (PROTOCOL.md §5).

A command-line tool, not a test:

    python test_sd3.py --checkpoint_path ./pretrain/stable-diffusion-3-medium-diffusers --prompt "..." \
        --height 4096 --width 3072
    python test_sd3.py --checkpoint_path outputs/sd3-wlf/checkpoint-5000 --prompt "..."

A training checkpoint-N works directly: its transformer/, the other components from the run's base pipeline.
Defaults: 28 steps, guidance 7.0, empty negative prompt (the paper's settings); all flags: --help.
"""
import generation
from errors import exit_on_usage_error


def main(args):
    return generation.main(args)


def parse_args(argv=None):
    """The flags of generation.build_parser with the paper's SD3 defaults (models.MODELS["sd3"])."""
    return generation.parse_args("sd3", argv)


if __name__ == "__main__":
    exit_on_usage_error("test_sd3.py", main, parse_args())
