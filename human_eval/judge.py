"""The VLM judge (study.py judge): the paper's Table 11 prompt through the `openai` client against any OpenAI-compatible
endpoint, every pair asked in both orders, each numbered answer parsed; answers stored as rater judge:<model> in the
study's database, failures stored as errors with the raw text, never as votes (PROTOCOL.md §12)."""
import base64
import io
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import openai
from PIL import Image, ImageOps
from tqdm import tqdm

from errors import UsageError
from human_eval import assign, store

# Table 11 of the paper [P1], verbatim; "(prompt)" is where the caption goes.
SYSTEM_PROMPT = ("As an AI visual assistant, you are analyzing two specific images. When presented with a specific "
                 "caption, it is required to evaluate visual aesthetics, prompt coherence and fine details.")
USER_PROMPT = ("The caption for the two images is: (prompt). Please answer the following questions: 1. Visual "
               "Aesthetics: Given the prompt, which image is of higher-quality and aesthetically more pleasing? 2. "
               "Prompt Adherence: Which image looks more representative to the text shown above and faithfully follows "
               "it? 3. Fine Details: Which image more accurately represents the fine visual details? Focus on clarity, "
               "sharpness, and texture. Assess the fidelity of fine elements such as edges, patterns, and nuances in "
               "color. The more precise representation of these details is preferred! Ignore other aspects. Please "
               "respond me strictly in the following format: ")
PUBLISHED_FORMAT = ("1. Visual Aesthetics: (the first image is better) or (the second image is better). The reason is "
                    "(give your reason here). 3. Fine Details: (the first image is better) or (the second image is "
                    "better). The reason is (give your reason here). 3. Fine Details: (the first image is better) or "
                    "(the second image is better). The reason is (give your reason here).")
# The published format line repeats "3. Fine Details" where "2. Prompt Adherence" belongs; the default mends that.
FORMATS = {"published": PUBLISHED_FORMAT,
           "fixed": PUBLISHED_FORMAT.replace("3. Fine Details", "2. Prompt Adherence", 1)}
SECTIONS = {"visual aesthetics": "aesthetics", "prompt adherence": "prompt_adherence", "fine details": "fine_details"}
IN_ORDER = ("aesthetics", "prompt_adherence", "fine_details")  # the items 1, 2, 3 of the prompt
HEADING = re.compile(r"(?:\b[1-3]\s*[.):]\s*|^[\s>#*_-]*)[*_]*\s*(visual aesthetics|prompt adherence|fine details)"
                     r"\s*[*_]*\s*:", re.I | re.M)
VERDICT = re.compile(r"\b(first|second)\s+image\s+is\s+better\b", re.I)
RETRIED = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)  # timeouts included


class JudgeError(RuntimeError):
    """No usable answer from the endpoint for a task (stored as an error with the raw text)."""


#################################################################################
#                                The conversation                               #
#################################################################################

def user_prompt(prompt, variant="fixed"):
    """Table 11's user text for a caption."""
    return USER_PROMPT.replace("(prompt)", prompt) + FORMATS[variant]


def data_url(image):
    """A PIL image as a base64 PNG data URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def crop_boxes(item, width, height, count, size):
    """`count` size × size boxes at places seeded by the item (the same in both orders and, for images of one size,
    the same pixels in both images); fractions of the free room, so images of different sizes get matching places."""
    rng = np.random.default_rng([item, 7])
    size_x, size_y = min(size, width), min(size, height)
    boxes = []
    for fx, fy in rng.random((count, 2)):
        x, y = round(fx * (width - size_x)), round(fy * (height - size_y))
        boxes.append((x, y, x + size_x, y + size_y))
    return boxes


def image_parts(data, item, max_side, crops, crop_size):
    """The `image_url` content parts of one image: the whole image downscaled to max_side, then its native crops."""
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    whole = image.copy()
    if max(whole.size) > max_side:
        whole.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    pictures = [whole] + [image.crop(box) for box in crop_boxes(item, *image.size, crops, crop_size)]
    return [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]


def messages_for(prompt, first, second, item, settings):
    """The chat messages of one order: Table 11's system text, then its user text and the first image's parts before
    the second's. first / second: the image files' bytes."""
    content = [{"type": "text", "text": user_prompt(prompt, settings["prompt_variant"])}]
    for data in (first, second):
        content += image_parts(data, item, settings["max_side"], settings["crops"], settings["crop_size"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


#################################################################################
#                                    Answers                                    #
#################################################################################

def parse_verdicts(text, questions):
    """({question: "left" | "right"}, problem or None) of a judge's answer: "left" when the first image sent is
    better. Each numbered section is read up to "The reason is"; a question with no verdict, or with both, is a
    problem. Sections are matched by name; when "Fine Details" comes twice and "Prompt Adherence" not at all (the
    published format line), by position."""
    heads = list(HEADING.finditer(text))
    sections = []
    for k, head in enumerate(heads):
        body = text[head.end():heads[k + 1].start() if k + 1 < len(heads) else len(text)]
        claim = re.split(r"the reason is", body, maxsplit=1, flags=re.I)[0]
        sections.append((SECTIONS[head.group(1).lower()], {v.lower() for v in VERDICT.findall(claim)}))
    names = [name for name, _ in sections]
    if len(sections) == 3 and names.count("fine_details") == 2 and "prompt_adherence" not in names:
        sections = [(name, found) for name, (_, found) in zip(IN_ORDER, sections)]
    verdicts, problems = {}, []
    for question in questions:
        found = set().union(*[f for name, f in sections if name == question])
        if len(found) == 1:
            verdicts[question] = "left" if found == {"first"} else "right"
        else:
            problems.append(f"{question}: {'no verdict' if not found else 'both images named better'}")
    return verdicts, "; ".join(problems) or None


def complete(client, messages, settings, temperature):
    """The text of one chat completion. Timeouts, connection failures, 429 and 5xx are retried by the openai client
    (`max_retries`: its exponential backoff, or the server's Retry-After); JudgeError when no usable text comes back;
    UsageError when the key or the model is refused."""
    options = {"max_tokens": settings["max_tokens"]}
    if temperature is not None:
        options["temperature"] = temperature
    try:
        response = client.chat.completions.create(model=settings["model"], messages=messages, **options)
    except RETRIED as error:
        raise JudgeError(f"{type(error).__name__} after {settings['retries'] + 1} tries: {error}") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
        raise UsageError(f"--base_url {settings['base_url']} refused the key ({error.status_code}); set "
                         f"${settings['api_key_env']} (--api_key_env)") from None
    except openai.NotFoundError:
        raise UsageError(f"--base_url {settings['base_url']} / --model {settings['model']}: not found (404); "
                         f"check both") from None
    except (openai.APIError, ValueError) as error:  # another 4xx, or a body the client could not read as JSON
        raise JudgeError(f"{type(error).__name__}: {error}") from None
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise JudgeError(f"a response without a message: {str(response)[:300]}")
    message = choices[0].message
    if getattr(message, "refusal", None):
        return f"[refusal] {message.refusal}"
    if not isinstance(message.content, str) or not message.content.strip():
        raise JudgeError(f"an empty answer (finish_reason {choices[0].finish_reason!r})")
    return message.content


def judge_task(client, task, settings):
    """(task id, verdicts or None, error or None, raw text): one order of one pair; an answer lacking a verdict is
    asked again once at temperature 0, then stored as an error."""
    raw = []
    try:
        for temperature in (settings["temperature"], 0.0):
            raw.append(complete(client, task["messages"](), settings, temperature))
            verdicts, problem = parse_verdicts(raw[-1], settings["questions"])
            if problem is None:
                return task["id"], verdicts, None, raw[-1]
    except JudgeError as error:
        return task["id"], None, str(error), "\n---- asked again at temperature 0 ----\n".join(raw)
    return task["id"], None, f"unparsable after a retry at temperature 0 ({problem})", \
        "\n---- asked again at temperature 0 ----\n".join(raw)


#################################################################################
#                                      Run                                      #
#################################################################################

def open_tasks(conn, study, task_ids, settings):
    """[{"id", "messages": a function building the messages}] of the tasks to ask; images read (and checked against
    their hash at creation) when the request is built."""
    tasks = []
    for task_id in task_ids:
        task, item, shown = store.task_sides(conn, task_id)
        rows = [conn.execute("SELECT * FROM images WHERE id = ?", (image,)).fetchone() for image in shown]

        def messages(rows=rows, item=item):
            first, second = (store.read_image(study, row) for row in rows)
            if first is None or second is None:
                raise JudgeError(f"an image of item {item['id']} changed or is gone since the study was created")
            return messages_for(item["prompt"], first, second, item["id"], settings)

        tasks.append({"id": task_id, "messages": messages})
    return tasks


def run(args):
    """Ask every pair of the study in both orders (tasks answered in an earlier run are not asked again)."""
    conn = store.connect(args.study)
    meta = store.read_meta(conn)
    if meta["kind"] != "pairwise":
        raise UsageError(f"{args.study} is a {meta['kind']} study: the judge compares pairs")
    if any(row["prompt"] is None for row in store.items(conn, "pairwise")):
        raise UsageError(f"{args.study} has no prompts: Table 11's judge prompt states the caption; create the study "
                         f"with a per_image.csv in the folders or --prompts")
    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"${args.api_key_env} is not set: sending no key (local servers need none)", file=sys.stderr)
    client = openai.OpenAI(base_url=args.base_url, api_key=key or "none", timeout=args.timeout,
                           max_retries=args.retries)
    settings = {"model": args.model, "base_url": args.base_url, "api_key_env": args.api_key_env,
                "questions": meta["questions"], "prompt_variant": args.prompt_variant, "max_side": args.max_side,
                "crops": args.crops, "crop_size": args.crop_size, "temperature": args.temperature,
                "max_tokens": args.max_tokens, "retries": args.retries}
    tasks = open_tasks(conn, args.study, assign.judge_tasks(conn, args.model), settings)
    answered = failed = 0
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(judge_task, client, task, settings) for task in tasks]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"judge {args.model}", unit="ask"):
                task_id, verdicts, error, raw = future.result()
                with store.transaction(conn):  # each answer committed as it comes: a killed run resumes
                    if verdicts is None:
                        store.record_judge_error(conn, task_id, error, raw)
                    else:
                        store.record_answer(conn, store.JUDGE_PREFIX + args.model, task_id, verdicts, meta)
                answered, failed = answered + (verdicts is not None), failed + (verdicts is None)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    print(f"judge {args.model}: {answered} answered, {failed} failed (stored as errors; run again to retry them)",
          file=sys.stderr)
    return answered, failed
