"""Synthetic TL;DR-style preference data with a learnable rule and planted, recorded label noise.

Each post is a short Reddit-style story about a subreddit topic built from a few key facts (who, what,
where, how the writer feels) plus a variable number of neutral filler sentences. The preferred summary
restates some of the post's facts; the other one is

* ``"contradict"``: the same kind of sentence with facts that are *not* in the post (same topic),
* ``"off_topic"``: a faithful-looking summary of an unrelated post from another subreddit, or
* ``"generic"``: vague text that mentions no fact.

Both summaries are built from 1 to 3 clauses drawn from the same length distribution, so length alone
predicts the preference at chance level; telling them apart needs matching the summary's words against the
post, which a small pretrained encoder with LoRA learns quickly. A seeded ``label_noise`` fraction of pairs
is flipped (chosen and rejected swapped); ``pair.meta["flipped"]`` and ``dataset.flipped_ids`` record them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from prefprune.data.loading import PreferenceDataset, PreferencePair, load_preferences, tldr_prompt

__all__ = ["NEGATIVE_KINDS", "load_or_generate", "make_synthetic"]

NEGATIVE_KINDS = ("contradict", "off_topic", "generic")
# Mixture of rejected-summary kinds; contradictions are the hard case (they look like good summaries).
_KIND_WEIGHTS = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class _Topic:
    subreddit: str
    verb: str  # "{verb} the {thing}" reads as a clause
    who: tuple[str, ...]
    thing: tuple[str, ...]
    place: tuple[str, ...]


_TOPICS = (
    _Topic(
        "relationships",
        "keep arguing about",
        ("girlfriend", "boyfriend", "wife", "husband", "roommate", "sister", "brother", "best friend"),
        (
            "wedding",
            "vacation",
            "apartment",
            "text messages",
            "birthday party",
            "holiday visit",
            "chores",
            "new job",
        ),
        ("restaurant", "airport", "kitchen", "family dinner", "bar", "beach", "car", "gym"),
    ),
    _Topic(
        "personalfinance",
        "cannot agree on",
        ("landlord", "accountant", "father", "mother", "business partner", "uncle", "coworker", "fiance"),
        (
            "mortgage",
            "credit card debt",
            "student loan",
            "car loan",
            "retirement account",
            "tax refund",
            "emergency fund",
            "rent increase",
        ),
        (
            "bank",
            "office",
            "dealership",
            "tax office",
            "credit union",
            "lawyer's office",
            "phone call",
            "meeting",
        ),
    ),
    _Topic(
        "cooking",
        "keep ruining",
        ("grandmother", "flatmate", "chef", "neighbor", "aunt", "son", "daughter", "partner"),
        (
            "sourdough bread",
            "lasagna",
            "risotto",
            "pancakes",
            "curry",
            "pie crust",
            "roast chicken",
            "dumplings",
        ),
        ("cooking class", "barbecue", "potluck", "bakery", "food truck", "dinner party", "picnic", "cafe"),
    ),
    _Topic(
        "running",
        "got hurt training for",
        ("coach", "running buddy", "physio", "teammate", "cousin", "trainer", "club captain", "doctor"),
        (
            "marathon",
            "half marathon",
            "trail race",
            "track meet",
            "ultramarathon",
            "charity 10k",
            "relay",
            "triathlon",
        ),
        ("park", "track", "mountain trail", "treadmill", "river path", "stadium", "hill course", "city loop"),
    ),
    _Topic(
        "gaming",
        "lost all progress in",
        (
            "little brother",
            "guildmate",
            "streamer",
            "clanmate",
            "online friend",
            "stepdad",
            "teammate",
            "nephew",
        ),
        (
            "console",
            "save file",
            "ranked season",
            "raid",
            "speedrun",
            "open world game",
            "card collection",
            "mod pack",
        ),
        (
            "tournament",
            "lan party",
            "arcade",
            "discord call",
            "convention",
            "server",
            "living room",
            "internet cafe",
        ),
    ),
    _Topic(
        "legaladvice",
        "got sued over",
        (
            "employer",
            "contractor",
            "tenant",
            "ex-spouse",
            "insurer",
            "hoa president",
            "dentist",
            "neighbor's son",
        ),
        (
            "fence",
            "security deposit",
            "parking ticket",
            "broken window",
            "unpaid invoice",
            "dog bite",
            "noise complaint",
            "car accident",
        ),
        (
            "courthouse",
            "parking lot",
            "driveway",
            "construction site",
            "clinic",
            "hearing",
            "backyard",
            "leasing office",
        ),
    ),
    _Topic(
        "dogs",
        "worry constantly about",
        ("vet", "dog walker", "groomer", "breeder", "trainer", "housemate", "shelter volunteer", "sitter"),
        ("puppy", "rescue greyhound", "old labrador", "husky", "beagle", "corgi", "border collie", "terrier"),
        ("dog park", "kennel", "vet clinic", "hiking trail", "shelter", "backyard", "pet store", "beach"),
    ),
    _Topic(
        "travel",
        "have trouble planning",
        (
            "travel agent",
            "tour guide",
            "host",
            "flight attendant",
            "travel buddy",
            "cousin",
            "in-laws",
            "hostel owner",
        ),
        (
            "backpacking trip",
            "honeymoon",
            "road trip",
            "cruise",
            "study abroad",
            "train journey",
            "ski trip",
            "family reunion",
        ),
        (
            "hostel",
            "train station",
            "border crossing",
            "hotel lobby",
            "embassy",
            "campsite",
            "harbor",
            "visa office",
        ),
    ),
)
_FEELINGS = (
    "anxious",
    "angry",
    "confused",
    "exhausted",
    "guilty",
    "frustrated",
    "heartbroken",
    "stressed",
    "embarrassed",
    "lonely",
)
_WHEN = (
    "last week",
    "yesterday",
    "two months ago",
    "over the weekend",
    "last night",
    "a year ago",
    "this morning",
    "in january",
)
_FILLER = (
    "Some background first.",
    "I have tried to stay calm about it.",
    "Sorry for formatting, I am on mobile.",
    "This has been going on for a while now.",
    "I do not really know who else to ask.",
    "Throwaway account for obvious reasons.",
    "Everyone I asked gives me different answers.",
    "I know this might sound silly to some of you.",
    "Thanks in advance for reading this far.",
    "Edit: a few people asked, so here are more details.",
    "I am in my twenties if that matters.",
    "It keeps me awake at night.",
    "My friends think I am overreacting.",
    "I have never dealt with this before.",
)
_TITLES = (
    "Need advice, not sure what to do",
    "Am I overreacting?",
    "Help please",
    "What would you do?",
    "Long post, sorry",
    "Need some outside perspective",
    "How do I handle this?",
    "Is this normal?",
)
# Clauses used for summaries; fact clauses have slots, generic ones do not. Same count range → same lengths.
_FACT_CLAUSES = (
    "my {who} and I {verb} the {thing}",
    "it started at the {place}",
    "I feel {feeling} about the {thing}",
    "the {thing} issue with my {who}",
    "things went wrong at the {place} with my {who}",
    "now I am {feeling}",
)
_GENERIC_CLAUSES = (
    "need advice on what to do next",
    "not sure how to handle this situation",
    "things are complicated and I feel lost",
    "please help me figure this out",
    "it is a long story but it matters to me",
    "people keep telling me different things",
    "I do not know what the right move is",
    "what should I do now",
)


def _facts(rng: random.Random, topic: _Topic) -> dict[str, str]:
    return {
        "who": rng.choice(topic.who),
        "thing": rng.choice(topic.thing),
        "place": rng.choice(topic.place),
        "feeling": rng.choice(_FEELINGS),
        "verb": topic.verb,
    }


def _post(rng: random.Random, facts: dict[str, str]) -> str:
    core = [
        "My {who} and I {verb} the {thing}.".format(**facts),
        "It all happened at the {place} {when}.".format(when=rng.choice(_WHEN), **facts),
        "Since then I feel {feeling} and I cannot stop thinking about the {thing}.".format(**facts),
    ]
    sentences = core + rng.sample(_FILLER, rng.randint(0, 5))
    # The first fact stays first so the post reads like a story; the rest is shuffled so position is no cue.
    rest = sentences[1:]
    rng.shuffle(rest)
    return " ".join([sentences[0], *rest])


def _summary(rng: random.Random, facts: dict[str, str] | None, n_clauses: int) -> str:
    if facts is None:
        clauses = rng.sample(_GENERIC_CLAUSES, n_clauses)
    else:
        clauses = [c.format(**facts) for c in rng.sample(_FACT_CLAUSES, n_clauses)]
    text = ", ".join(clauses)
    # TL;DR summaries follow "TL;DR:" after a space, as in the OpenAI data.
    return " " + text[0].upper() + text[1:] + rng.choice((".", ".", "?", "!"))


def _contradicting(rng: random.Random, topic: _Topic, facts: dict[str, str]) -> dict[str, str]:
    wrong = dict(facts)
    for key, pool in (
        ("who", topic.who),
        ("thing", topic.thing),
        ("place", topic.place),
        ("feeling", _FEELINGS),
    ):
        wrong[key] = rng.choice([v for v in pool if v != facts[key]])
    return wrong


def make_synthetic(n_pairs: int, *, label_noise: float = 0.0, seed: int = 0) -> PreferenceDataset:
    """Generate a synthetic TL;DR-style preference dataset.

    Args:
        n_pairs: Number of pairs.
        label_noise: Fraction of pairs whose chosen and rejected summaries are swapped; exactly
            ``round(label_noise * n_pairs)`` pairs, chosen with the seed. The texts do not depend on it: the
            noisy dataset is the clean one (same seed) with those pairs swapped.
        seed: Seed; the same seed gives the same dataset (texts, ids, flips).

    Returns:
        A dataset with schema ``"tldr"`` (prompt in the TL;DR layout, post as the truncatable span), ids
        ``"syn{seed}-{index}"``, ``meta["flipped"]`` on flipped pairs, ``meta["kind"]`` the kind of the
        dispreferred summary (one of :data:`NEGATIVE_KINDS`) and ``meta["record"]`` a TL;DR comparison record.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be positive, got {n_pairs!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")
    rng = random.Random(seed)
    n_flip = round(label_noise * n_pairs)
    # A separate stream picks the flips, so the texts do not depend on label_noise: the noisy dataset is the
    # clean one with some labels swapped (the ground truth for noise-detection experiments).
    flipped = set(random.Random(f"prefprune-synthetic-flips-{seed}").sample(range(n_pairs), n_flip))
    width = max(6, len(str(n_pairs - 1)))
    pairs: list[PreferencePair] = []
    seen: set[tuple[str, str, str]] = set()
    while len(pairs) < n_pairs:
        topic = rng.choice(_TOPICS)
        facts = _facts(rng, topic)
        post = _post(rng, facts)
        title = rng.choice(_TITLES)
        prompt, span = tldr_prompt(post, title=title, subreddit=topic.subreddit)
        good = _summary(rng, facts, rng.randint(1, 3))
        kind = rng.choices(NEGATIVE_KINDS, weights=_KIND_WEIGHTS)[0]
        if kind == "contradict":
            bad_facts: dict[str, str] | None = _contradicting(rng, topic, facts)
        elif kind == "off_topic":
            other = rng.choice([t for t in _TOPICS if t is not topic])
            bad_facts = _facts(rng, other)
        else:
            bad_facts = None
        bad = _summary(rng, bad_facts, rng.randint(1, 3))
        if good == bad or (prompt, good, bad) in seen:
            # Astronomically rare; regenerate so the dataset has no exact duplicates (they would be dropped on
            # reload, breaking the save → load round trip).
            continue
        seen.add((prompt, good, bad))
        pid = f"syn{seed}-{len(pairs):0{width}d}"
        flip = len(pairs) in flipped
        chosen, rejected = (bad, good) if flip else (good, bad)
        # The record lists the summaries in a random order, as the OpenAI comparisons do.
        choice = rng.randint(0, 1)
        summaries = [{"text": chosen, "policy": "synthetic"}, {"text": rejected, "policy": "synthetic"}]
        if choice == 1:
            summaries.reverse()
        record = {
            "id": pid,
            "info": {"id": pid, "post": post, "title": title, "subreddit": topic.subreddit},
            "summaries": summaries,
            "choice": choice,
            "extra": {"kind": kind},
            # Every record carries the flag so columnar formats (parquet, CSV) keep one schema.
            "flipped": flip,
        }
        meta = {"record": record, "kind": kind, "line": len(pairs) + 1}
        if flip:
            meta["flipped"] = True
        pairs.append(PreferencePair(pid, prompt, chosen, rejected, span, meta))
    stats = {
        "records": n_pairs,
        "dropped_identical": 0,
        "dropped_duplicate": 0,
        "skipped_bad": 0,
        "flipped": n_flip,
    }
    return PreferenceDataset(pairs, schema="tldr", source=f"synthetic(n={n_pairs}, seed={seed})", stats=stats)


def load_or_generate(
    source: str,
    *,
    synthetic_pairs: int = 1000,
    label_noise: float = 0.0,
    seed: int = 0,
    max_pairs: int | None = None,
    **load_kwargs: Any,
) -> PreferenceDataset:
    """`make_synthetic` when `source` is ``"synthetic"``, else `load_preferences(source, **load_kwargs)`.

    The one place where the CLI and the experiment turn a data setting into a dataset. For synthetic
    data, `max_pairs` caps `synthetic_pairs`; `label_noise` and `seed` apply to synthetic data only.
    """
    if source == "synthetic":
        n = synthetic_pairs if max_pairs is None else min(synthetic_pairs, max_pairs)
        return make_synthetic(n, label_noise=label_noise, seed=seed)
    return load_preferences(source, max_pairs=max_pairs, **load_kwargs)
