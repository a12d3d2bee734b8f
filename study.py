"""Human evaluation of generated images: the paper's pairwise preference study (Fig. 6) and patch ratings (Table 1),
a VLM judge asked in both orders (Table 11's prompt), and their statistics (docs/study.md).

    python study.py create --kind pairwise --folders runs/flux runs/flux_wlf --labels base wlf --out STUDY
    python study.py create --kind patches --folders runs/flux --patch_size 512 --patches_per_image 2 --out STUDY
    python study.py raters STUDY --add 10                # prints "<rater_id> <token>" per new rater
    python study.py serve STUDY --port 8000              # raters open http://HOST:8000/?token=<token>
    python study.py judge STUDY --base_url http://localhost:8080/v1 --model NAME
    python study.py export STUDY --out answers.csv
    python study.py analyze STUDY --out results/

The study's whole state is STUDY/study.sqlite (its modules: human_eval/).
"""
import argparse
import sys
from pathlib import Path

from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error
from human_eval import store

QUESTIONS = list(store.PAIRWISE_QUESTIONS)
MIN_RESAMPLES = 200  # --bootstrap: 0, or enough resamples that each end of a 95 % interval rests on 5 of them


#################################################################################
#                                  Sub-commands                                 #
#################################################################################

def create(args):
    """Make a new study in --out (each sub-command imports only what it needs: serve starts without torch)."""
    from human_eval import design

    labels = args.labels or [Path(f).resolve().name for f in args.folders]
    if len(labels) != len(args.folders) or len(set(labels)) != len(labels):
        raise UsageError(f"--labels: give one distinct label per folder ({len(args.folders)}), got {labels}")
    if design.GOLD_LABEL in labels:
        raise UsageError(f"--labels: {design.GOLD_LABEL!r} names the gold items' blurred copies; choose another label")
    for flag in ("gold", "repeat", "gold_min_pass"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UsageError(f"--{flag} is a share from 0 to 1, got {getattr(args, flag)}")
    check_at_least(1, tasks_per_rater=args.tasks_per_rater)
    if args.kind == "pairwise":
        if len(args.folders) != 2:
            raise UsageError(f"--kind pairwise compares two --folders, got {len(args.folders)}")
        meta = design.create_pairwise(args.out, args.folders, labels, args.questions, args.prompts, args.gold,
                                      args.gold_min_pass, args.repeat, args.tasks_per_rater, args.seed)
    else:
        if args.gold:
            raise UsageError("--gold is for pairwise studies (an image against its blurred copy)")
        if args.patch_size < 64:
            raise UsageError(f"--patch_size must be at least 64 (the GLCM Score's patch), got {args.patch_size}")
        check_at_least(1, patches_per_image=args.patches_per_image)
        meta = design.create_patches(args.out, args.folders, labels, args.patch_size, args.patches_per_image,
                                     args.repeat, args.tasks_per_rater, args.seed, args.workers)
    items = f"{meta['n_items']} pairs + {meta['n_gold']} gold" if args.kind == "pairwise" else \
        f"{meta['n_items']} patches"
    print(f"study in {args.out}: {items}; add raters with `python study.py raters {args.out} --add N`",
          file=sys.stderr)


def raters(args):
    """Add raters (one `<rater_id> <token>` line each on standard output), or list them with their progress."""
    from human_eval import assign

    conn = store.connect(args.study)
    if args.add is not None:
        check_at_least(1, add=args.add)
        for rater, token in assign.add_raters(conn, args.add):
            print(rater, token)
        return
    for rater, token in store.raters(conn):
        progress = store.next_task(conn, rater, store.read_meta(conn))["progress"]
        print(rater, token, f"{progress['done']}/{progress['total']}")


def serve(args):
    """Serve the page and the API until interrupted."""
    from human_eval import server

    store.connect(args.study).close()  # a missing study is a usage error before uvicorn starts
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serving on {args.host}: tokens travel in clear text over plain HTTP; put a TLS reverse proxy in front "
              "(docs/study.md)", file=sys.stderr)
    print(f"serving {args.study} on http://{args.host}:{args.port}/?token=<token> (Ctrl-C to stop)", file=sys.stderr)
    server.serve(args.study, args.host, args.port)


def judge(args):
    """Ask the VLM judge every pair in both orders."""
    from human_eval import judge as vlm_judge

    check_at_least(1, max_side=args.max_side, workers=args.workers, crop_size=args.crop_size)
    check_at_least(0, crops=args.crops, retries=args.retries)
    return vlm_judge.run(args)


def export(args):
    """Write every answer as one CSV row per question."""
    import outputs

    rows = store.answer_rows(store.connect(args.study))
    outputs.write_csv(args.out, rows, store.EXPORT_COLUMNS)
    print(f"{len(rows)} answers -> {args.out}", file=sys.stderr)


def analyze(args):
    """Statistics, results.json/.csv and the plots."""
    from human_eval import analyze as analysis

    if args.bootstrap != 0 and args.bootstrap < MIN_RESAMPLES:
        raise UsageError(f"--bootstrap must be 0 (no intervals) or at least {MIN_RESAMPLES}, got {args.bootstrap}")
    return analysis.run(args)


COMMANDS = {"create": create, "raters": raters, "serve": serve, "judge": judge, "export": export, "analyze": analyze}


def main(args):
    return COMMANDS[args.command](args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = lambda name, text: commands.add_parser(  # noqa: E731
        name, help=text, description=text, formatter_class=HelpFormatter)

    p = new("create", "make a study: pairs of two runs' images, or patches to rate")
    p.add_argument("--kind", choices=["pairwise", "patches"], required=True,
                   help="pairwise preference or patch ratings")
    p.add_argument("--folders", nargs="+", required=True, help="folders of images (pairwise: two runs of the same "
                                                              "prompts and seeds, paired by file name)")
    p.add_argument("--labels", nargs="+", default=None, help="a name per folder (default: the folder names)")
    p.add_argument("--out", required=True, help="the new study's folder (STUDY)")
    p.add_argument("--prompts", default=None, help="a metadata.jsonl (file_name, text) giving each image its prompt "
                                                   "when the folders have no per_image.csv")
    p.add_argument("--questions", nargs="+", choices=QUESTIONS, default=QUESTIONS, help="pairwise questions asked")
    p.add_argument("--gold", type=float, default=0.0, help="share of extra pairs of an image against its heavily "
                                                           "blurred copy, to screen raters")
    p.add_argument("--gold_min_pass", type=float, default=0.8, help="raters passing fewer of their gold pairs are "
                                                                    "left out of the statistics")
    p.add_argument("--repeat", type=float, default=0.0, help="share of each rater's tasks shown again later (pairs "
                                                             "with the sides swapped)")
    p.add_argument("--tasks_per_rater", type=int, default=None, help="items per rater, dealt so that items get "
                                                                     "raters evenly (default: every item)")
    p.add_argument("--patch_size", type=int, default=512, help="patches: side in pixels, cut at native resolution")
    p.add_argument("--patches_per_image", type=int, default=2, help="patches: random patches per image (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order, the sides, gold, repeats and patches")
    p.add_argument("--workers", type=int, default=None, help="patches: processes measuring GLCM and CR "
                                                             "(default: every core)")

    p = new("raters", "add raters (prints '<rater_id> <token>' per new rater), or list them with their progress")
    p.add_argument("study", help="the study's folder")
    p.add_argument("--add", type=int, default=None, help="how many raters to add")

    p = new("serve", "serve the raters' page and the JSON API")
    p.add_argument("study", help="the study's folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to bind")

    p = new("judge", "ask a VLM judge (any OpenAI-compatible endpoint) every pair, in both orders")
    p.add_argument("study", help="the study's folder")
    p.add_argument("--base_url", required=True, help="the endpoint, e.g. http://localhost:8000/v1 (vLLM), "
                                                     "https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="model name; its answers are stored as rater judge:<model>")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--prompt_variant", choices=["fixed", "published"], default="fixed",
                   help="Table 11's format line with items 1, 2, 3 (fixed) or as published (3, 3)")
    p.add_argument("--max_side", type=int, default=2048, help="images downscaled to this longest side")
    p.add_argument("--crops", type=int, default=0, help="native-resolution crops sent after each image, at the same "
                                                        "places in both")
    p.add_argument("--crop_size", type=int, default=512, help="side of each crop")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature of the first ask (default: "
                                                                   "the endpoint's); a retry is at 0")
    p.add_argument("--max_tokens", type=int, default=1024, help="longest answer")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as timed out")
    p.add_argument("--retries", type=int, default=5, help="retries after a timeout, 429 or 5xx, by the openai client: "
                                                          "after the server's Retry-After, else 0.5 s doubling to 8 s")
    p.add_argument("--workers", type=int, default=4, help="requests in flight at once")

    p = new("export", "write every answer as CSV, one row per answer to one question")
    p.add_argument("study", help="the study's folder")
    p.add_argument("--out", required=True, help="the CSV file")

    p = new("analyze", "win rates, agreement, biases and correlations with intervals; results.json/.csv and plots")
    p.add_argument("study", help="the study's folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (of prompts and raters) for each 95%% "
                                                               "interval; 0: none")
    p.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--metric_csv", default=None, help="patches: a CSV of more per-patch metrics (column 'patch': the "
                                                      "patch's file name, one column per metric, e.g. musiq, maniqa)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("study.py", main, parse_args())
