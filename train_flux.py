"""WLF fine-tuning of the FLUX.1-dev transformer at 4K: models.MODELS["flux"] with the loop of training.py.

    accelerate launch --config_file ds_config.yaml train_flux.py --pretrained_model_name_or_path ... (see train_flux.sh)
"""
import training
from errors import exit_on_usage_error
from models import MODELS

SPEC = MODELS["flux"]


def main(args):
    return training.train(args, SPEC)


def parse_args(argv=None):
    """The flags of training.build_parser, with FLUX.1-dev's defaults (T5 length 512, training guidance 3.5)."""
    return training.build_parser(__doc__, SPEC).parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("train_flux.py", main, parse_args())
