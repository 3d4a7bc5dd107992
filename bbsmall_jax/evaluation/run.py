"""`evaluate`: a model's figures on held-out dialogue examples (perplexity, token accuracy and hits@1 of its
references; distinct-n and length of its generated replies) and the time each part took."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Optional, Sequence

import numpy as np

from bbsmall_jax.evaluation.candidates import choose_candidates
from bbsmall_jax.evaluation.text_metrics import distinct_n, mean_words, repetition
from bbsmall_jax.runtime.examples import Example, tokenize_examples
from bbsmall_jax.runtime.scoring import score_replies


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How examples are tokenized (as training does), ranked and answered."""

    max_source_length: int = 64  # context tokens kept, oldest whole turns dropped first
    max_target_length: int = 32  # reply tokens scored, its __end__ included, cut as training cuts labels
    separator: str = "newline"  # how context turns are joined (training's `separator`)
    add_end: bool = False  # training's `add_end`: __end__ after each context
    candidates: int = 20  # hits@1 ranks the true reply among this many
    hits_examples: int = 500  # examples ranked, a seeded sample (0: all); each scores `candidates` replies
    seed: int = 0  # the draw of the ranked examples and of their distractors
    batch_size: int = 8  # contexts per hits@1 batch (times the candidates: the decoder rows) and per generate call
    max_generate: int = 100  # replies generated, for the first examples


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """The figures of one evaluation."""

    examples: int  # examples scored (those with a non-empty context)
    tokens: int  # reference reply tokens scored
    perplexity: float  # exp(mean token NLL of the references)
    token_accuracy: float  # share of reference tokens that are the model's most likely token
    hits_at_1: Optional[float]  # share of ranked examples whose reference outranks all distractors; None without any
    hits_candidates: int  # candidates per example (the reference included)
    hits_examples: int  # examples ranked
    generated: int  # replies generated with the model's default settings
    distinct_1: float
    distinct_2: float
    mean_words: float
    distinct_replies: float  # distinct generated replies / replies
    top_reply_share: float  # the most frequent generated reply's share
    score_s: float
    generate_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _progress(desc: str, unit: str, show: bool, total: Optional[int] = None):
    """A progress bar on stderr, drawn from its first update after half a second: nothing is printed before
    its total is known, nor for a phase that ends sooner."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, total=total, disable=not show, file=sys.stderr, dynamic_ncols=True,
                leave=False, delay=0.5)


def hits_sample(n: int, count: int, seed: int) -> np.ndarray:
    """The examples hits@1 ranks, ascending: all n when `count` is 0 or at least n, else `count` drawn with `seed`."""
    if not count or count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def generate_replies(responder, contexts: Sequence[list[int]], batch_size: int, progress=None) -> list[str]:
    """The responder's reply text to each context (token ids), `batch_size` contexts per `generate` call."""
    texts = []
    for start in range(0, len(contexts), batch_size):
        texts += [replies[0].text for replies in responder.replies(contexts[start:start + batch_size])]
        if progress is not None:
            progress.update(len(texts) - progress.n)
    return texts


def evaluate(model, tokenizer, examples: Sequence[Example], settings: EvalSettings = EvalSettings(),
             show_progress: bool = False) -> EvalReport:
    """Score the reference replies of `examples`; rank those of `settings.hits_examples` of them each among
    `settings.candidates` (itself and distractors drawn from the other references) by mean token
    log-probability; generate replies to the first `settings.max_generate` contexts with the model's
    generation defaults and measure their variety."""
    from bbsmall_jax.runtime.responder import Responder

    data = tokenize_examples(examples, tokenizer, settings.max_source_length, settings.max_target_length,
                             settings.separator, settings.add_end)
    references = [examples[i].response for i in data.example_index]

    began = time.perf_counter()
    everyone = np.arange(len(data))
    rows = settings.batch_size * settings.candidates
    with _progress("perplexity", "batch", show_progress) as bar:
        scores = score_replies(model, data, everyone, everyone[:, None], settings.max_source_length,
                               settings.max_target_length, rows, bar)
    tokens = int(scores.tokens.sum())
    nll = -float(scores.log_prob.sum()) / max(tokens, 1)
    ranked = hits_sample(len(data), settings.hits_examples, settings.seed)
    candidates = choose_candidates(references, settings.candidates, settings.seed)[ranked]
    hits = None
    if candidates.shape[1] > 1:
        with _progress(f"hits@1/{candidates.shape[1]}", "batch", show_progress) as bar:
            mean = score_replies(model, data, ranked, candidates, settings.max_source_length,
                                 settings.max_target_length, rows, bar).mean_log_prob
        hits = float(np.mean(mean[:, 0] > mean[:, 1:].max(axis=1)))
    scored = time.perf_counter()

    contexts = [data.source_ids(i).tolist() for i in range(min(settings.max_generate, len(data)))]
    with _progress("generating", "reply", show_progress and bool(contexts), len(contexts)) as bar:
        replies = generate_replies(Responder(model, tokenizer), contexts, settings.batch_size, bar)
    distinct, top = repetition(replies)
    return EvalReport(
        examples=len(data), tokens=tokens, perplexity=math.exp(min(nll, 700.0)),
        token_accuracy=float(scores.correct.sum()) / max(tokens, 1), hits_at_1=hits,
        hits_candidates=int(candidates.shape[1]), hits_examples=len(ranked) if hits is not None else 0,
        generated=len(replies), distinct_1=distinct_n(replies, 1), distinct_2=distinct_n(replies, 2),
        mean_words=mean_words(replies), distinct_replies=distinct, top_reply_share=top, score_s=scored - began,
        generate_s=time.perf_counter() - scored)
