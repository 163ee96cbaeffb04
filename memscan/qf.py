"""The Question-Formation language of McCoy, Frank and Linzen (2020), as docs/theory.md states it.

A line is `<declarative> . <task> <target>`: task `decl` copies the sentence and ends
with `.`; task `quest` fronts the main auxiliary, deletes it in place and ends with
`?`. Train and test items never put a relative clause on the subject of a question (so
"front the first auxiliary" and "front the main one" agree); the generalization split
holds only such questions. Generation is deterministic in (seed, document index) and
random-access, so any document can be produced without producing the ones before it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DETERMINERS = ("the", "some", "my", "your", "our", "her")
SINGULAR_NOUNS = (
    "newt", "orangutan", "peacock", "quail", "raven", "salamander", "tyrannosaurus",
    "unicorn", "vulture", "walrus", "xylophone", "yak", "zebra",
)
PLURAL_NOUNS = tuple(n + "es" if n.endswith("s") else n + "s" for n in SINGULAR_NOUNS)
INTRANSITIVE_VERBS = ("giggle", "smile", "sleep", "swim", "wait", "move", "change", "read", "eat")
TRANSITIVE_VERBS = (
    "entertain", "amuse", "high_five", "applaud", "confuse", "admire", "accept", "remember",
    "comfort",
)
AUX_SINGULAR = ("does", "doesn't")
AUX_PLURAL = ("do", "don't")
PREPOSITIONS = ("around", "near", "with", "upon", "by", "behind", "above", "below")
RELATIVIZERS = ("who", "that")
MARKERS = (".", "?", "decl", "quest")
VOCABULARY = (
    DETERMINERS + SINGULAR_NOUNS + PLURAL_NOUNS + INTRANSITIVE_VERBS + TRANSITIVE_VERBS
    + AUX_SINGULAR + AUX_PLURAL + PREPOSITIONS + RELATIVIZERS + MARKERS
)
SPECIAL_TOKENS = ("<eos>", "<pad>", "<unk>")
LINE_SEPARATOR = "\n"  # the tokenizer maps it to <eos>, so lines stay apart in a chunk

MODIFIERS = ("none", "pp", "rc")
# Observed marginals of the original data (docs/theory.md).
SUBJECT_MODIFIER_P = {"none": 0.54, "pp": 0.28, "rc": 0.18}
OBJECT_MODIFIER_P = {"none": 0.29, "pp": 0.31, "rc": 0.40}
TRANSITIVE_P = 0.89
QUESTION_P = 0.40
SPLITS = ("train", "test", "gen")


def _subject_modifier_given_task() -> dict[str, dict[str, float]]:
    """Subject-modifier probabilities per task that keep the overall marginals above.

    Questions may not have a subject relative clause, so their share of `none` and `pp`
    is renormalized and declaratives take all of `rc`.
    """
    p_rc = SUBJECT_MODIFIER_P["rc"]
    quest = {m: (0.0 if m == "rc" else p / (1 - p_rc)) for m, p in SUBJECT_MODIFIER_P.items()}
    decl = {m: (p - QUESTION_P * quest[m]) / (1 - QUESTION_P) for m, p in SUBJECT_MODIFIER_P.items()}
    return {"decl": decl, "quest": quest}


SUBJECT_MODIFIER_GIVEN_TASK = _subject_modifier_given_task()


@dataclass(frozen=True)
class Item:
    """One line of the language: its declarative, the task and the target."""

    declarative: tuple[str, ...]
    main_aux_index: int
    task: str
    subject_modifier: str

    @property
    def target(self) -> tuple[str, ...]:
        """The copy (`decl`) or the question with the main auxiliary fronted (`quest`)."""
        if self.task == "decl":
            return self.declarative + (".",)
        i = self.main_aux_index
        moved = (self.declarative[i],) + self.declarative[:i] + self.declarative[i + 1:]
        return moved + ("?",)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.declarative + (".", self.task) + self.target

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


class _Grammar:
    """Draws the rules of docs/theory.md from one `random.Random` (portable across Pythons).

    `nats` sums -log p of every choice made: a line parses uniquely, so this is the
    line's exact surprisal under the generator, and its mean is the language's entropy.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.nats = 0.0

    def pick(self, options: tuple[str, ...]) -> str:
        self.nats += math.log(len(options))
        return options[int(self.rng.random() * len(options))]

    def coin(self, p: float) -> bool:
        outcome = self.rng.random() < p
        self.nats -= math.log(p if outcome else 1 - p)
        return outcome

    def draw(self, probabilities: dict[str, float]) -> str:
        u, total = self.rng.random(), 0.0
        for outcome, p in probabilities.items():
            total += p
            if u < total:
                break
        self.nats -= math.log(probabilities[outcome])
        return outcome

    def noun(self) -> tuple[str, bool]:
        """A noun and whether it is plural (singular and plural equally likely)."""
        plural = self.coin(0.5)
        return self.pick(PLURAL_NOUNS if plural else SINGULAR_NOUNS), plural

    def aux(self, plural: bool) -> str:
        return self.pick(AUX_PLURAL if plural else AUX_SINGULAR)

    def relative_clause(self, head_plural: bool) -> list[str]:
        """Rel Aux V_intrans | Rel Det N Aux V_trans | Rel Aux V_trans Det N."""
        rel, form = self.pick(RELATIVIZERS), int(self.rng.random() * 3)
        self.nats += math.log(3)
        if form == 0:
            return [rel, self.aux(head_plural), self.pick(INTRANSITIVE_VERBS)]
        if form == 1:
            noun, plural = self.noun()
            return [rel, self.pick(DETERMINERS), noun, self.aux(plural), self.pick(TRANSITIVE_VERBS)]
        noun, _ = self.noun()
        return [rel, self.aux(head_plural), self.pick(TRANSITIVE_VERBS), self.pick(DETERMINERS), noun]

    def noun_phrase(self, modifier: str) -> tuple[list[str], bool]:
        """Det N | Det N Prep Det N' | Det N RC; returns the tokens and the head's number."""
        noun, plural = self.noun()
        phrase = [self.pick(DETERMINERS), noun]
        if modifier == "pp":
            phrase += [self.pick(PREPOSITIONS), self.pick(DETERMINERS), self.noun()[0]]
        elif modifier == "rc":
            phrase += self.relative_clause(plural)
        return phrase, plural

    def item(self, task: str, subject_modifier: str) -> Item:
        subject, plural = self.noun_phrase(subject_modifier)
        verb_phrase = [self.aux(plural)]
        if self.coin(TRANSITIVE_P):
            obj, _ = self.noun_phrase(self.draw(OBJECT_MODIFIER_P))
            verb_phrase += [self.pick(TRANSITIVE_VERBS)] + obj
        else:
            verb_phrase.append(self.pick(INTRANSITIVE_VERBS))
        return Item(tuple(subject + verb_phrase), len(subject), task, subject_modifier)


def _document_rng(seed: int, doc_id: int) -> random.Random:
    digest = hashlib.blake2b(f"memscan.qf:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def sample_item(rng: random.Random, generalization: bool = False) -> tuple[Item, float]:
    """One train/test item, or one generalization item (a question whose subject has an RC), and its surprisal in nats."""
    grammar = _Grammar(rng)
    if generalization:
        return grammar.item("quest", "rc"), grammar.nats
    task = "quest" if grammar.coin(QUESTION_P) else "decl"
    return grammar.item(task, grammar.draw(SUBJECT_MODIFIER_GIVEN_TASK[task])), grammar.nats


def entropy_rate(lines: int = 20_000, seed: int = 0) -> float:
    """The train/test language's entropy in nats per token (each line's <eos> included): the loss
    a Bayes-optimal model reaches. It is 1.00, the value the paper's QF training loss settles near."""
    rng = random.Random(seed)
    nats = tokens = 0.0
    for _ in range(lines):
        item, surprisal = sample_item(rng)
        nats, tokens = nats + surprisal, tokens + len(item.tokens) + 1
    return nats / tokens


@dataclass(frozen=True)
class QFConfig:
    """Size of the built-in corpus; the defaults give about 2M tokens, as in the paper."""

    documents: int = 1300
    lines_per_document: int = 64
    # A generalization document holds only questions with a subject relative clause.
    generalization_fraction: float = 0.05


def document(config: QFConfig, seed: int, doc_id: int) -> tuple[list[Item], bool]:
    """Document `doc_id`'s items and whether it belongs to the generalization split."""
    rng = _document_rng(seed, doc_id)
    generalization = rng.random() < config.generalization_fraction
    return [sample_item(rng, generalization)[0] for _ in range(config.lines_per_document)], generalization


def documents(config: QFConfig, seed: int) -> Iterator[tuple[int, str, str | None]]:
    """(doc_id, text, forced split) for every document; forced split is "gen" or None."""
    for doc_id in range(config.documents):
        items, generalization = document(config, seed, doc_id)
        yield doc_id, LINE_SEPARATOR.join(item.text for item in items), ("gen" if generalization else None)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the 68 words plus <eos>, <pad> and <unk>; newline -> <eos>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(LINE_SEPARATOR, " <eos> ")
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", bos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=1 << 20,
    )
