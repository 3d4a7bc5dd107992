"""How varied a chat model's replies are: distinct replies, the top reply's share and mean words over
small-talk prompts, under its default generation settings or candidate ones.

    python bench/demo_replies.py [--model DIR] [--prompts tuning|check|all]
                                 [--settings '{"num_beams": 1, "do_sample": true, "top_p": 0.9}' ...]

Each `--settings` is a JSON object of generation overrides; the model's defaults (`{}`) always run first.
The demo model's decoding defaults were chosen on the "tuning" prompts; "check" holds other prompts, kept
apart to see that the choice carries over.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

TUNING_PROMPTS = [
    "hi! how are you today?", "what do you do for a living?", "do you have any pets?", "i love pizza",
    "tell me about yourself", "what's your favorite movie?", "i just got back from the gym",
    "where are you from?", "what are you doing this weekend?", "i'm so tired today",
    "do you like to read?", "what kind of music do you listen to?", "i have two cats and a dog",
    "i'm a teacher at a high school", "it's raining again here", "have you ever been to paris?",
    "what did you have for dinner?", "i failed my driving test today", "do you play any sports?",
    "my birthday is next week", "what's the best vacation you've taken?", "i'm learning to play the guitar",
    "do you have any siblings?", "i can't decide what to cook tonight", "what's your favorite season?",
    "i just started a new job", "are you a morning person?", "my favorite food is sushi",
    "how was your day?", "i've been watching a lot of netflix lately", "do you like coffee or tea?",
    "i'm going to a concert tonight", "what are your hobbies?", "i moved to a new city last month",
    "what do you think about video games?", "my car broke down this morning", "do you like to travel?",
    "i'm studying computer science", "what's the weather like where you are?", "good night, talk tomorrow!",
]

CHECK_PROMPTS = [
    "hey there, what's up?", "what's your job?", "have you got a dog or a cat?", "i really like burgers",
    "so what are you into?", "seen any good films lately?", "i went for a long run this morning",
    "which country do you live in?", "any plans for saturday?", "i didn't sleep well last night",
    "what's the last book you read?", "who is your favorite singer?", "my dog is named max",
    "i work as a nurse", "it's so hot outside today", "i want to visit japan someday",
    "i made pasta for lunch", "i got a promotion at work!", "do you watch football?",
    "i'm turning thirty soon", "where did you go on holiday last year?", "i'm trying to learn spanish",
    "i'm an only child", "i'm baking cookies right now", "do you like the snow?",
    "my first day at college is tomorrow", "do you sleep in on weekends?", "i could eat tacos every day",
    "what have you been up to?", "i binge watched a whole series yesterday", "are you a cat person?",
    "i just bought tickets to see my favorite band", "what do you do for fun?", "i miss my hometown",
    "do you play chess?", "i locked my keys in the car", "what's the coolest place you've been?",
    "math class is so hard", "is it sunny there?", "i have to go to bed now, bye!",
]

PROMPT_SETS = {"tuning": TUNING_PROMPTS, "check": CHECK_PROMPTS, "all": TUNING_PROMPTS + CHECK_PROMPTS}


def variety(replies: list[str]) -> dict:
    """Distinct share, the commonest reply and its share, and the mean number of words."""
    counts = collections.Counter(replies)
    top, top_count = counts.most_common(1)[0]
    return {"distinct": len(counts) / len(replies), "top_share": top_count / len(replies), "top_reply": top,
            "mean_words": sum(len(r.split()) for r in replies) / len(replies)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded demo model)")
    parser.add_argument("--prompts", default="tuning", choices=sorted(PROMPT_SETS))
    parser.add_argument("--settings", action="append", default=[], help="JSON generation overrides (repeatable)")
    parser.add_argument("--show", action="store_true", help="print every prompt and reply")
    args = parser.parse_args(argv)

    from bbsmall_jax.runtime.responder import Responder, load_chat_model

    prompts = PROMPT_SETS[args.prompts]
    responder = Responder(*load_chat_model(args.model))
    print(f"{len(prompts)} {args.prompts} prompts; defaults: {responder.model.generation_config.to_dict()}")
    for text in ["{}", *args.settings]:
        overrides = json.loads(text)
        start = time.perf_counter()
        replies = responder.reply([[p] for p in prompts], **overrides)
        seconds = time.perf_counter() - start
        stats = variety(replies)
        print(f"{text}: distinct {stats['distinct']:.0%}, top {stats['top_share']:.0%} "
              f"({stats['top_reply']!r}), mean words {stats['mean_words']:.1f}, {seconds:.1f} s")
        if args.show:
            for prompt, reply in zip(prompts, replies):
                print(f"  {prompt!r} -> {reply!r}")


if __name__ == "__main__":
    main()
