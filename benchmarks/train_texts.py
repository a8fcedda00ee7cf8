"""Training texts for label-free distillation on a real text encoder, none of which downloads and none
of which is an evaluation text of benchmarks/text_corpus.py.

The corpora (`training_texts(count, seed, corpus)`; `mixed_texts` takes equal shares of several):
- "prose": English sentences of the prose shipped with Python itself: the language reference
  topics (``pydoc_data.topics``, what ``help("if")`` prints) and the docstrings of the standard
  library's pure-Python modules (read with ``ast``, not imported). A sentence is kept when it has
  5-40 words and looks like prose (mostly alphabetic words, no code or markup characters).
- "generated": everyday sentences from frames and word lists written here (people, verbs,
  places, times) around the ImageNet class names open_clip ships; none of text_corpus.py's
  word lists.
- "wordnet": WordNet 3.0's usage examples (about 35,000 sentences lexicographers wrote) and its
  glosses (definitions) as sentences, from Debian's wordnet-base (`apt-get install wordnet-base`,
  read from /usr/share/wordnet).
- "wordnet-generated": frames of everyday sentences whose people, things, places, verbs and
  adjectives are WordNet's common lemmas (by WordNet's own sense counts): a broad vocabulary.
- "synonyms": texts of the generated, wordnet and wordnet-generated corpora with about a third of
  their content words replaced by WordNet synonyms (another lemma of one of the word's two most
  frequent senses): the word-replacement augmentation of TinyBERT and TernaryBERT, and EDA's
  synonym replacement, with WordNet standing in for a masked language model. The teacher embeds
  words the student would otherwise only meet in the evaluation's paraphrases.
- "fortunes": the sentences of the fortune cookies Debian's fortunes and fortunes-min ship
  (`apt-get install fortunes fortunes-min`, read from /usr/share/games/fortunes): about 17,000
  sentences people wrote (quotations, jokes, proverbs, verse, questions), the one natural,
  varied English prose here that is neither documentation nor a dictionary.
- "mixed": half prose, half generated (all of the prose, about 7,000 sentences, when it is short).
- "templates": text_corpus.py's own generator with other seeds: the evaluation's vocabulary
  and sentence forms, sentences disjoint from the evaluation's. It measures what in-domain
  unlabelled text buys, and is reported apart from the other three.
Every corpus drops the evaluation and calibration sentences; deterministic for a given Python.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig

from text_corpus import calibration_sentences, evaluation_pairs, sentence_pairs

CORPORA = ("mixed", "prose", "generated", "wordnet", "wordnet-generated", "synonyms", "fortunes", "templates")


# ---------------------------------------------------------------- prose shipped with Python

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BAD = re.compile(r"(>>>|::|\.\.\.|[{}\[\]<>=_`|\\@#$%^*~/]|\(\)|\w\.\w+\(|\bhttps?\b|\bdef\b|\bself\b|\bNone\b|\bTrue\b|\bFalse\b)")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[,;:.!?\")]*$")
# stdlib directories whose docstrings are tests, vendored code, or non-English
_SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "site-packages", "ensurepip", "__pycache__",
              "turtledemo", "tkinter", "idlelib", "pydoc_data", "encodings", "config-3.11-x86_64-linux-gnu"}


def _paragraphs(text: str):
    """Prose paragraphs: consecutive non-indented, non-empty lines, joined with spaces."""
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (line[:1] in " \t") or set(stripped) <= set("*=-~^#+"):
            if block:
                yield " ".join(block)
            block = []
            continue
        block.append(stripped)
    if block:
        yield " ".join(block)


def _dedent_docstring(doc: str) -> str:
    lines = doc.expandtabs().splitlines()
    indents = [len(l) - len(l.lstrip()) for l in lines[1:] if l.strip()]
    cut = min(indents) if indents else 0
    return "\n".join([lines[0].strip()] + [l[cut:] for l in lines[1:]]) if lines else ""


def _good(sentence: str) -> bool:
    words = sentence.split()
    if not 5 <= len(words) <= 40:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _BAD.search(sentence):
        return False
    if sum(bool(_WORD.match(w)) for w in words) < 0.9 * len(words):
        return False
    letters = sum(c.isalpha() for c in sentence)
    if letters < 0.75 * len(sentence.replace(" ", "")):
        return False
    if sentence.count('"') % 2 or sentence.count("(") != sentence.count(")"):
        return False
    return True


def _sentences(text: str):
    for paragraph in _paragraphs(text):
        for s in _SENT_SPLIT.split(paragraph):
            s = " ".join(s.split())
            if _good(s):
                yield s


def _topic_texts():
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield from _sentences(topics[key])


def _stdlib_docstring_texts():
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc:
                        yield from _sentences(_dedent_docstring(doc))


# ---------------------------------------------------------------- generated everyday sentences

PEOPLE = ["a postman", "my grandmother", "the bus driver", "a teenager", "our landlord", "the mechanic", "a tailor",
          "the waiter", "my cousin", "a carpenter", "the lifeguard", "a photographer", "the plumber", "an astronaut",
          "the shopkeeper", "a violinist", "my uncle", "the receptionist", "a sailor", "the veterinarian", "a jogger",
          "the coach", "a scientist", "my sister", "the mayor", "a poet", "the janitor", "a zookeeper", "the baker",
          "an accountant", "a surfer", "the pharmacist", "a dentist", "the principal", "my roommate", "a climber"]
VERBS = ["noticed", "fed", "drew", "chased", "watched", "described", "photographed", "rescued", "washed", "measured",
         "counted", "sketched", "followed", "admired", "lifted", "moved", "wrapped", "delivered", "polished", "weighed",
         "studied", "pointed at", "talked about", "laughed at", "searched for", "waited for", "dreamed about"]
ADJS = ["tiny", "huge", "muddy", "shiny", "sleepy", "striped", "wet", "colourful", "dusty", "fluffy", "rusty",
        "brand new", "strange", "beautiful", "ugly", "noisy", "quiet", "pale", "dark", "bright", "heavy", "light"]
WHERE = ["in the backyard", "on the beach", "at the zoo", "in a small flat", "on the rooftop", "in the forest",
         "beside the river", "at the farm", "in the kitchen", "on a crowded train", "in the parking lot",
         "at the campsite", "in the library basement", "on the balcony", "at the petrol station", "in the attic",
         "near the lighthouse", "at the supermarket", "in the desert", "on the island", "at the wedding"]
WHEN = ["this afternoon", "last spring", "every morning", "on Friday evening", "in the summer", "at midnight",
        "three weeks ago", "during the holidays", "after school", "before breakfast", "in October", "at noon"]
FRAMES = [
    "{P} {V} a {A} {N} {W} {T}.",
    "{T}, {P} {V} a {A} {N} {W}.",
    "There was a {A} {N} {W}, and {P} {V} it.",
    "Have you ever seen a {A} {N} {W}?",
    "{P} says the {N} {W} looked {A2} {T}.",
    "A {A} {N} was sitting {W} when {P} arrived.",
    "{P} {V} the {N} and then went home.",
    "Nobody expected to find a {N} {W}.",
    "Is it true that {P} {V} a {N} {T}?",
    "The picture shows a {A} {N} {W}.",
    "I think {P} {V} the wrong {N}.",
    "We heard that a {N} was seen {W} {T}.",
]


@functools.lru_cache(maxsize=None)
def classnames() -> tuple[str, ...]:
    """open_clip's ImageNet class names, read from its source as text (open_clip need not import)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "zero_shot_metadata.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "IMAGENET_CLASSNAMES":
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("IMAGENET_CLASSNAMES not found")


def _generated(count: int, seed: int) -> list[str]:
    names = classnames()
    return _fill_frames(count, random.Random(1000 + seed), FRAMES, lambda rng: dict(
        P=rng.choice(PEOPLE), V=rng.choice(VERBS), A=rng.choice(ADJS), A2=rng.choice(ADJS), N=rng.choice(names),
        W=rng.choice(WHERE), T=rng.choice(WHEN)))


def _fill_frames(count: int, rng: random.Random, frames, slots) -> list[str]:
    """`count` distinct sentences: a frame of `frames` with `slots(rng)` filled in, "a" before a vowel
    made "an", the first letter capitalized."""
    out, seen = [], set()
    while len(out) < count:
        s = rng.choice(frames).format(**slots(rng))
        s = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", lambda m: m.group(1) + "n ", s)
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---------------------------------------------------------------- WordNet's usage examples and glosses

WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base (apt-get install wordnet-base)
_QUOTED = re.compile(r'"([^"]+)"')


def _wordnet_lines(name: str):
    """The lines of WordNet's database file `name`, or an error saying how to install it."""
    path = os.path.join(WORDNET_DIR, name)
    if not os.path.isfile(path):
        raise RuntimeError(f"the WordNet corpora read {path}: install Debian's wordnet-base (apt-get install wordnet-base)")
    with open(path, encoding="latin-1") as f:
        yield from f


def _synsets(pos: str):
    """(fields, gloss) of each synset line of data.{pos}: the fields before '|' split on spaces."""
    for line in _wordnet_lines(f"data.{pos}"):
        if not line.startswith("  ") and "|" in line:  # "  ": the license header
            head, gloss = line.split("|", 1)
            yield head.split(), gloss


def _wordnet_sentence(text: str) -> str | None:
    text = " ".join(text.strip().strip(";").split())
    if not 4 <= len(text.split()) <= 40 or _BAD.search(text):
        return None
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


@functools.lru_cache(maxsize=None)
def _wordnet() -> tuple[str, ...]:
    """WordNet 3.0's usage examples (everyday sentences written by lexicographers, about 35,000) and
    its glosses (definitions), as sentences: the part after '|' of each synset line of data.{pos}."""
    found = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for _fields, gloss in _synsets(pos):
            for example in _QUOTED.findall(gloss):
                sentence = _wordnet_sentence(example)
                if sentence:
                    found.add(sentence)
            definition = _wordnet_sentence(_QUOTED.sub("", gloss).split(";")[0])
            if definition:
                found.add(definition)
    return tuple(sorted(s for s in found if s.lower() not in _excluded()))


# WordNet lexicographer files (the sense key's lex_filenum) whose common lemmas fill the
# wordnet-generated frames' slots
_SLOT_LEXFILES = {
    "person": (1, {18}), "thing": (1, {6, 13, 5, 20, 17}), "place": (1, {15}),
    "verb": (2, {35, 40, 36, 34, 39}), "adj": (3, {0}),
}
WORDNET_FRAMES = [
    "The {P} wants to {V} the {A} {N} {W}.",
    "Did the {P} {V} a {A} {N} {T}?",
    "{T}, the {P} will {V} the {N} {W}.",
    "Please {V} the {A} {N} before the {P} arrives.",
    "The {P} could not {V} the {N} {W} {T}.",
    "I saw the {P} {V} a {A} {N} {W}.",
    "Why would a {P} {V} the {A} {N}?",
    "Nobody asked the {P} to {V} the {N} {T}.",
    "A {A} {N} is {W}, and the {P} is going to {V} it.",
    "The {P} and the {P2} tried to {V} a {N} {W}.",
]
_WHERE_WORDS = ("in the", "near the", "at the", "behind the", "outside the", "beside the")




@functools.lru_cache(maxsize=None)
def _wordnet_vocabulary(min_count: int = 3) -> dict[str, tuple[str, ...]]:
    """Common lemmas of each slot's lexicographer files: people, things, places, verbs, adjectives.
    A lemma counts when WordNet writes it in lower case there (no proper nouns), verbs only with a
    transitive frame ("Somebody ----s something / somebody"), and when its senses were tagged at
    least `min_count` times in all (cntlist.rev: WordNet's corpus counts, the only frequency used)."""
    tagged: dict[str, int] = {}
    for line in _wordnet_lines("cntlist.rev"):
        key, _sense, count = line.split()
        lemma = key.partition("%")[0]
        tagged[lemma] = tagged.get(lemma, 0) + int(count)
    found: dict[str, set[str]] = {slot: set() for slot in _SLOT_LEXFILES}
    for pos, ss_digit in (("noun", 1), ("verb", 2), ("adj", 3)):
        for fields, _gloss in _synsets(pos):
            lexfile, count = int(fields[1]), int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(count)]
            if pos == "verb":  # frames: f_cnt, then "+ f_num w_num" triples after the pointers
                pointers = int(fields[4 + 2 * count])
                at = 5 + 2 * count + 4 * pointers
                frames = [(int(fields[at + 2 + 3 * j]), int(fields[at + 3 + 3 * j], 16)) for j in range(int(fields[at]))]
                words = [w for i, w in enumerate(words) if any(f in (8, 9) and n in (0, i + 1) for f, n in frames)]
            for slot, (digit, lexfiles) in _SLOT_LEXFILES.items():
                if digit != ss_digit or lexfile not in lexfiles:
                    continue
                for word in words:
                    word = re.sub(r"\(.*\)$", "", word)  # adjective markers: (a), (p), (ip)
                    parts = word.split("_")
                    if len(parts) <= 2 and all(w.isalpha() and w.islower() for w in parts) and tagged.get(word, 0) >= min_count:
                        found[slot].add(" ".join(parts))
    return {slot: tuple(sorted(words)) for slot, words in found.items()}


def _wordnet_generated(count: int, seed: int) -> list[str]:
    """Sentences from the frames above, their slots filled with WordNet's common lemmas (a broad
    everyday vocabulary, chosen by frequency alone), times from the generated corpus's list."""
    vocabulary = _wordnet_vocabulary()
    return _fill_frames(count, random.Random(2000 + seed), WORDNET_FRAMES, lambda rng: dict(
        P=rng.choice(vocabulary["person"]), P2=rng.choice(vocabulary["person"]), V=rng.choice(vocabulary["verb"]),
        A=rng.choice(vocabulary["adj"]), N=rng.choice(vocabulary["thing"]),
        W=f"{rng.choice(_WHERE_WORDS)} {rng.choice(vocabulary['place'])}", T=rng.choice(WHEN)))


# ---------------------------------------------------------------- synonym replacement

# Function words (several are also WordNet lemmas: "in" the inch, "an" the element, "will" the noun)
_STOPWORDS = frozenset("""a an the and or but if then than so as of at by for from in into on onto to with
without about above after before behind below beneath beside between beyond during near over under
through up down out off again once here there when where why how what which who whom whose this that
these those i me my we our you your he him his she her it its they them their is are was were be been
being am have has had do does did will would shall should can could may might must not no nor all any
both each few more most other some such only own same too very just also even still yet ago one two""".split())
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*")


@functools.lru_cache(maxsize=None)
def _wordnet_synonyms(senses: int = 2) -> dict[str, tuple[str, ...]]:
    """Lower-case word -> the other lemmas of its `senses` most frequent synsets (index.{pos} lists a
    word's synsets by frequency) in its most frequent part of speech (the most tagged senses), so
    that "light" the noun is not swapped for "unaccented". Inflected forms WordNet lists (*.exc:
    "saw" of "see") are left out, as are lemmas with capitals (names) or characters other than
    letters, spaces and hyphens."""
    lemmas: dict[tuple[str, str], list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for fields, _gloss in _synsets(pos):
            count = int(fields[3], 16)
            lemmas[(pos, fields[0])] = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
    inflected = {line.split()[0] for pos in ("noun", "verb", "adj", "adv") for line in _wordnet_lines(f"{pos}.exc")}
    best: dict[str, tuple[int, list[str]]] = {}  # word -> (tagged senses, synonyms) of its most tagged pos
    for pos in ("noun", "verb", "adj", "adv"):
        for line in _wordnet_lines(f"index.{pos}"):
            if line.startswith("  "):
                continue
            fields = line.split()
            word, synsets = fields[0], int(fields[2])
            tagged = int(fields[len(fields) - synsets - 1])
            if not word.isalpha() or word in _STOPWORDS or word in inflected or tagged <= best.get(word, (-1,))[0]:
                continue
            synonyms = []
            for offset in fields[len(fields) - synsets:][:senses]:
                synonyms += [lemma for lemma in lemmas[(pos, offset)]
                             if lemma != word and re.fullmatch(r"[a-z][a-z -]*", lemma) and lemma not in synonyms]
            best[word] = (tagged, synonyms)
    return {word: tuple(synonyms) for word, (_tagged, synonyms) in best.items() if synonyms}


def synonym_variant(text: str, rng: random.Random, rate: float = 0.3) -> str:
    """`text` with each content word that WordNet lists (in that form: no inflection is undone)
    replaced, with probability `rate`, by one of its synonyms; the first letter's case kept."""
    synonyms = _wordnet_synonyms()

    def replace(match):
        word = match.group(0)
        choices = synonyms.get(word.lower())
        if not choices or word.lower() in _STOPWORDS or rng.random() >= rate:
            return word
        new = rng.choice(choices)
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return _TOKEN.sub(replace, text)


def _synonym_texts(count: int, seed: int) -> list[str]:
    """Synonym variants of texts drawn (with another seed) from the three corpora above."""
    rng = random.Random(3000 + seed)
    out, seen = [], set()
    sources = mixed_texts(count + 2000, 3000 + seed, ("generated", "wordnet", "wordnet-generated"))
    for text in sources:
        variant = synonym_variant(text, rng)
        if variant != text and variant not in seen and variant.lower() not in _excluded():
            seen.add(variant)
            out.append(variant)
    return out


# ---------------------------------------------------------------- fortune cookies

FORTUNES_DIR = "/usr/share/games/fortunes"  # Debian's fortunes + fortunes-min
_ATTRIBUTION = re.compile(r"\s*--")  # a fortune's "-- Author, Work" line


@functools.lru_cache(maxsize=None)
def _fortunes() -> tuple[str, ...]:
    """The sentences of every fortune file: entries are separated by '%' lines; attribution lines are
    dropped, the rest joined and split into sentences that pass the prose filter."""
    if not os.path.isdir(FORTUNES_DIR):
        raise RuntimeError(f"the fortunes corpus reads {FORTUNES_DIR}: install Debian's fortunes and fortunes-min "
                           "(apt-get install fortunes fortunes-min)")
    found = set()
    for name in sorted(os.listdir(FORTUNES_DIR)):
        path = os.path.join(FORTUNES_DIR, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue  # .dat: strfile's index; .u8: links to the same text
        with open(path, encoding="utf-8", errors="replace") as f:
            for entry in f.read().split("\n%\n"):
                body = " ".join(line for line in entry.splitlines() if not _ATTRIBUTION.match(line))
                for sentence in _SENT_SPLIT.split(" ".join(body.split())):
                    if _good(sentence):
                        found.add(sentence)
    return tuple(sorted(s for s in found if s.lower() not in _excluded()))


# ---------------------------------------------------------------- the corpora


@functools.lru_cache(maxsize=None)
def _excluded() -> frozenset[str]:
    """Every text of benchmarks/text_corpus.py's evaluation pairs and calibration sentences, lower-cased."""
    out = {s.lower() for pair in evaluation_pairs(400) for s in pair}
    out.update(s.lower() for s in calibration_sentences(2048))
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def _prose() -> tuple[str, ...]:
    found = set(_topic_texts()) | set(_stdlib_docstring_texts())
    return tuple(sorted(s for s in found if s.lower() not in _excluded()))


def _templates(count: int, seed: int) -> list[str]:
    out, seen = [], set()
    for a, b in sentence_pairs(count, 10_000 + seed):
        for s in (a, b):
            if s.lower() not in _excluded() and s not in seen:
                seen.add(s)
                out.append(s)
    return out


_FIXED_POOLS = {"prose": _prose, "wordnet": _wordnet, "fortunes": _fortunes}


def training_texts(count: int, seed: int = 0, corpus: str = "mixed") -> list[str]:
    """`count` distinct training texts of `corpus` (see the module doc), shuffled by `seed`."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    if corpus in _FIXED_POOLS:
        pool = list(_FIXED_POOLS[corpus]())
        if count > len(pool):
            raise ValueError(f"only {len(pool)} {corpus} texts are available, asked for {count}")
    elif corpus == "generated":
        pool = [s for s in _generated(count + 2000, seed) if s.lower() not in _excluded()]
    elif corpus == "wordnet-generated":
        pool = [s for s in _wordnet_generated(count + 2000, seed) if s.lower() not in _excluded()]
    elif corpus == "synonyms":
        pool = _synonym_texts(count, seed)
    elif corpus == "templates":
        pool = _templates(count, seed)
        while len(pool) < count:
            pool = _templates(2 * len(pool) + count, seed)
    else:
        prose = list(_prose())
        random.Random(seed).shuffle(prose)
        prose = prose[:count - count // 2]  # half prose, as far as there is enough
        pool = prose + training_texts(count - len(prose), seed, "generated")
    random.Random(seed).shuffle(pool)
    return pool[:count]


def mixed_texts(count: int, seed: int, corpora: "list[str] | tuple[str, ...]") -> list[str]:
    """Equal shares of `count` texts from each of `corpora`, shuffled by `seed`; a text that two
    corpora share is kept once (so there may be a few fewer than `count`)."""
    if not corpora:
        raise ValueError("corpora: name at least one corpus")
    out: list[str] = []
    seen: set[str] = set()
    for i, corpus in enumerate(corpora):
        share = count // len(corpora) + (i < count % len(corpora))
        for text in training_texts(share, seed, corpus):
            if text not in seen:
                seen.add(text)
                out.append(text)
    random.Random(seed).shuffle(out)
    return out


if __name__ == "__main__":
    import time

    for corpus in CORPORA:
        started = time.perf_counter()
        texts = training_texts(5000 if corpus in ("prose", "fortunes") else 20000, 0, corpus)
        print(f"{corpus}: {len(texts)} texts in {time.perf_counter() - started:.1f}s, e.g.")
        for s in texts[:3]:
            print("   ", s)
