"""WLF fine-tuning of the Stable Diffusion 3 transformer at 4K: models.MODELS["sd3"] with the loop of training.py.

    accelerate launch --config_file ds_config.yaml train_sd3.py --pretrained_model_name_or_path ... (see train_sd3.sh)
"""
import training
from errors import exit_on_usage_error
from models import MODELS

SPEC = MODELS["sd3"]


def main(args):
    return training.train(args, SPEC)


def parse_args(argv=None):
    """The flags of training.build_parser, with SD3's defaults (the authors' T5 length 77)."""
    return training.build_parser(__doc__, SPEC).parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("train_sd3.py", main, parse_args())
