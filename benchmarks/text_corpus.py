"""A small English corpus for PTQ quality on a real pretrained text encoder (all-MiniLM-L6-v2).

Sentence pairs are composed from hand-written word lists: each pair says the same thing
twice in different words and word order (a paraphrase), so that a sentence encoder
should retrieve a sentence's partner among all the others. Seeds make the corpus
reproducible; the evaluation and calibration sets come from different seeds and never
share a sentence.
"""
from __future__ import annotations

import random

SUBJECTS = [
    ("old fisherman", "elderly fisherman"), ("young doctor", "junior physician"), ("tired student", "exhausted pupil"),
    ("small child", "little kid"), ("famous singer", "well-known vocalist"), ("local farmer", "nearby grower"),
    ("new teacher", "recently hired instructor"), ("nervous pilot", "anxious aviator"), ("friendly neighbour", "kind person next door"),
    ("quiet librarian", "soft-spoken archivist"), ("busy chef", "hard-working cook"), ("curious tourist", "inquisitive traveller"),
    ("retired soldier", "former serviceman"), ("brave firefighter", "courageous firefighter"), ("clever engineer", "smart technician"),
    ("strict judge", "stern magistrate"), ("cheerful nurse", "happy caregiver"), ("lost dog", "stray hound"),
    ("grey cat", "silver-coated cat"), ("wealthy banker", "rich financier"), ("shy painter", "timid artist"),
    ("loud parrot", "noisy bird"), ("patient gardener", "calm horticulturist"), ("angry customer", "furious shopper"),
]
ACTIONS = [
    ("repaired", "fixed"), ("bought", "purchased"), ("dropped", "let fall"), ("painted", "coloured"),
    ("found", "discovered"), ("carried", "hauled"), ("cleaned", "scrubbed"), ("sold", "traded away"),
    ("borrowed", "took on loan"), ("photographed", "took a picture of"), ("described", "explained"),
    ("hid", "concealed"), ("opened", "unlocked"), ("built", "constructed"), ("ignored", "paid no attention to"),
    ("examined", "inspected"), ("returned", "brought back"), ("stole", "took without asking"),
]
OBJECTS = [
    ("a broken bicycle", "a damaged bike"), ("an ancient map", "a very old chart"), ("a wooden chair", "a timber seat"),
    ("the red umbrella", "the crimson parasol"), ("a heavy suitcase", "a weighty bag"), ("the silver key", "the metal key"),
    ("a large painting", "a big canvas"), ("the cracked window", "the damaged pane"), ("a fresh loaf of bread", "newly baked bread"),
    ("the leather wallet", "the hide purse"), ("a tiny boat", "a small vessel"), ("the noisy radio", "the loud wireless"),
    ("a glass vase", "a crystal jar"), ("the last ticket", "the final pass"), ("a secret letter", "a hidden note"),
    ("the dusty piano", "the neglected piano"), ("a pair of boots", "two boots"), ("the blue blanket", "the azure quilt"),
]
PLACES = [
    ("near the harbour", "close to the port"), ("in the crowded market", "at the busy bazaar"),
    ("behind the train station", "at the back of the railway station"), ("inside the museum", "within the gallery"),
    ("on the mountain road", "along the hill path"), ("at the village school", "in the town's schoolhouse"),
    ("by the frozen lake", "next to the icy pond"), ("in the hospital garden", "in the clinic's yard"),
    ("under the old bridge", "beneath the ancient overpass"), ("outside the bakery", "in front of the bread shop"),
    ("in the empty stadium", "inside the deserted arena"), ("at the airport", "in the air terminal"),
]
TIMES = [
    ("yesterday morning", "the previous morning"), ("last winter", "during the past winter"),
    ("late at night", "well after dark"), ("on Sunday", "at the weekend"), ("before lunch", "ahead of midday"),
    ("after the storm", "once the storm had passed"), ("two days ago", "a couple of days back"),
    ("at dawn", "at first light"), ("during the festival", "while the festival was on"),
]
QUESTIONS = [
    ("How do I reset my password?", "What is the way to change a forgotten password?"),
    ("Where is the nearest pharmacy?", "Which chemist is closest to here?"),
    ("When does the last bus leave?", "What time is the final bus departure?"),
    ("Can you recommend a good book?", "Which novel would you suggest reading?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("How much does the ticket cost?", "What is the price of a ticket?"),
    ("Is it going to rain tomorrow?", "Will there be rain tomorrow?"),
    ("What is the capital of Canada?", "Which city is Canada's capital?"),
    ("How long does the flight take?", "What is the duration of the flight?"),
    ("Who wrote this song?", "Which songwriter composed this tune?"),
    ("Where can I park my car?", "Where is parking available for my vehicle?"),
    ("How do plants make food?", "In what way do plants produce their nutrients?"),
]


def sentence_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (sentence, paraphrase) pairs; a different seed gives different pairs."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    questions = QUESTIONS[:]
    rng.shuffle(questions)
    while len(pairs) < count:
        if questions and rng.random() < 0.06:
            pair = questions.pop()
        else:
            (s1, s2), (a1, a2), (o1, o2), (p1, p2), (t1, t2) = (
                rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(TIMES))
            first = f"The {s1} {a1} {o1} {p1} {t1}."
            second = f"{t2[0].upper()}{t2[1:]}, {p2}, the {s2} {a2} {o2}."
            pair = (first, second) if rng.random() < 0.5 else (second, first)
        if pair[0] not in seen:
            seen.add(pair[0])
            pairs.append(pair)
    return pairs


EVAL_SEED, CALIBRATION_SEED = 2026, 7


def evaluation_pairs(count: int = 200) -> list[tuple[str, str]]:
    return sentence_pairs(count, EVAL_SEED)


def calibration_sentences(count: int = 128) -> list[str]:
    """Sentences for calibration, none of them in the evaluation pairs."""
    held_out = {s for pair in evaluation_pairs(400) for s in pair}
    out = []
    for a, b in sentence_pairs(4 * count, CALIBRATION_SEED):
        for s in (a, b):
            if s not in held_out and len(out) < count:
                out.append(s)
    return out
