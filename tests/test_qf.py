"""The Question-Formation generator against docs/theory.md: rules, transformation, vocabulary, splits, marginals."""

from __future__ import annotations

from collections import Counter

import pytest

from memscan import qf

SING, PLUR = set(qf.SINGULAR_NOUNS), set(qf.PLURAL_NOUNS)


def parse_np(t: list[str], i: int) -> list[tuple[int, bool, str]]:
    """Every parse of an NP starting at i: (end, head plural, modifier), checking agreement in RCs."""
    if i + 1 >= len(t) or t[i] not in qf.DETERMINERS or t[i + 1] not in SING | PLUR:
        return []
    plural = t[i + 1] in PLUR
    parses = [(i + 2, plural, "none")]
    j = i + 2
    if j + 2 < len(t) and t[j] in qf.PREPOSITIONS and t[j + 1] in qf.DETERMINERS and t[j + 2] in SING | PLUR:
        parses.append((j + 3, plural, "pp"))
    if j < len(t) and t[j] in qf.RELATIVIZERS:
        rest = t[j + 1:]
        if len(rest) >= 2 and agrees(rest[0], plural) and rest[1] in qf.INTRANSITIVE_VERBS:
            parses.append((j + 3, plural, "rc"))
        if (len(rest) >= 4 and rest[0] in qf.DETERMINERS and rest[1] in SING | PLUR
                and agrees(rest[2], rest[1] in PLUR) and rest[3] in qf.TRANSITIVE_VERBS):
            parses.append((j + 5, plural, "rc"))
        if (len(rest) >= 4 and agrees(rest[0], plural) and rest[1] in qf.TRANSITIVE_VERBS
                and rest[2] in qf.DETERMINERS and rest[3] in SING | PLUR):
            parses.append((j + 5, plural, "rc"))
    return parses


def agrees(aux: str, plural: bool) -> bool:
    return aux in (qf.AUX_PLURAL if plural else qf.AUX_SINGULAR)


def parse_sentence(t: list[str]) -> list[dict]:
    """All parses of a declarative: main auxiliary index, subject modifier, transitivity, object modifier."""
    parses = []
    for end, plural, modifier in parse_np(t, 0):
        if end >= len(t) or not agrees(t[end], plural):
            continue
        verb = end + 1
        if verb == len(t) - 1 and t[verb] in qf.INTRANSITIVE_VERBS:
            parses.append({"aux": end, "subject": modifier, "plural": plural, "transitive": False, "object": None})
        if verb < len(t) and t[verb] in qf.TRANSITIVE_VERBS:
            for obj_end, _, obj_modifier in parse_np(t, verb + 1):
                if obj_end == len(t):
                    parses.append({"aux": end, "subject": modifier, "plural": plural, "transitive": True,
                                   "object": obj_modifier})
    return parses


def parse_line(tokens: list[str]) -> tuple[dict, str]:
    dot = tokens.index(".")
    declarative, task, target = tokens[:dot], tokens[dot + 1], tokens[dot + 2:]
    parses = parse_sentence(declarative)
    assert len({p["aux"] for p in parses}) == 1, f"no unique parse: {tokens}"
    parse = parses[0]
    if task == "decl":
        assert target == declarative + ["."]
    else:
        assert task == "quest"
        j = parse["aux"]
        assert target == [declarative[j]] + declarative[:j] + declarative[j + 1:] + ["?"]
    return parse, task


@pytest.fixture(scope="module")
def corpus() -> list[tuple[list[list[str]], bool]]:
    config = qf.QFConfig(documents=400, lines_per_document=64, generalization_fraction=0.1)
    return [([item.tokens for item in items], gen) for items, gen in
            (qf.document(config, seed=3, doc_id=d) for d in range(config.documents))]


def test_vocabulary_has_the_68_tokens_of_the_paper():
    assert len(qf.VOCABULARY) == len(set(qf.VOCABULARY)) == 68
    assert (len(qf.DETERMINERS), len(qf.SINGULAR_NOUNS), len(qf.PLURAL_NOUNS)) == (6, 13, 13)
    assert "tyrannosauruses" in qf.PLURAL_NOUNS and "walruses" in qf.PLURAL_NOUNS
    assert (len(qf.INTRANSITIVE_VERBS), len(qf.TRANSITIVE_VERBS), len(qf.PREPOSITIONS)) == (9, 9, 8)


def test_every_line_follows_the_grammar_and_the_transformation(corpus):
    used = Counter()
    for lines, _ in corpus:
        for tokens in lines:
            parse_line(list(tokens))
            used.update(tokens)
    assert set(used) == set(qf.VOCABULARY)


def test_questions_in_train_and_test_never_have_a_subject_relative_clause(corpus):
    regular = gen_docs = 0
    for lines, gen in corpus:
        parsed = [parse_line(list(t)) for t in lines]
        if gen:
            gen_docs += 1
            assert all(task == "quest" and p["subject"] == "rc" for p, task in parsed)
        else:
            regular += 1
            assert not any(task == "quest" and p["subject"] == "rc" for p, task in parsed)
    assert gen_docs > 10 and regular > 300


def test_marginals_match_the_original_data(corpus):
    parsed = [parse_line(list(t)) for lines, gen in corpus if not gen for t in lines]
    n = len(parsed)
    share = lambda predicate, among=parsed: sum(map(predicate, among)) / len(among)  # noqa: E731
    assert n > 20000
    for modifier, p in qf.SUBJECT_MODIFIER_P.items():
        assert share(lambda x: x[0]["subject"] == modifier) == pytest.approx(p, abs=0.015)
    assert share(lambda x: x[1] == "quest") == pytest.approx(qf.QUESTION_P, abs=0.015)
    assert share(lambda x: x[0]["transitive"]) == pytest.approx(qf.TRANSITIVE_P, abs=0.01)
    transitive = [x for x in parsed if x[0]["transitive"]]
    for modifier, p in qf.OBJECT_MODIFIER_P.items():
        assert share(lambda x: x[0]["object"] == modifier, transitive) == pytest.approx(p, abs=0.015)
    assert share(lambda x: x[0]["plural"]) == pytest.approx(0.5, abs=0.015)


def test_generation_is_deterministic_and_random_access():
    config = qf.QFConfig(documents=5, lines_per_document=3)
    first, again = list(qf.documents(config, seed=1)), list(qf.documents(config, seed=1))
    assert first == again and first != list(qf.documents(config, seed=2))
    items, _ = qf.document(config, seed=1, doc_id=4)
    assert first[4][1] == qf.LINE_SEPARATOR.join(item.text for item in items)


def test_tokenizer_maps_every_word_and_separates_lines():
    tokenizer = qf.tokenizer()
    ids = tokenizer(" ".join(qf.VOCABULARY), add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == 68 and tokenizer.unk_token_id not in ids
    line_ids = tokenizer("the newt does giggle .\nsome yaks do swim .", add_special_tokens=False)["input_ids"]
    assert line_ids.count(tokenizer.eos_token_id) == 1 and len(line_ids) == 11
    assert tokenizer("the dragon", add_special_tokens=False)["input_ids"][1] == tokenizer.unk_token_id
    assert tokenizer.decode(ids) == " ".join(qf.VOCABULARY)


def test_surprisal_accounting_and_the_entropy_rate():
    import math
    import random

    rng = random.Random(7)
    for _ in range(2000):
        item, nats = qf.sample_item(rng)
        if item.task == "decl" and item.subject_modifier == "none" and len(item.declarative) == 4:
            break
    p_none = qf.SUBJECT_MODIFIER_GIVEN_TASK["decl"]["none"]
    expected = (-math.log(1 - qf.QUESTION_P) - math.log(p_none) + math.log(6) + math.log(2) + math.log(13)
                + math.log(2) - math.log(1 - qf.TRANSITIVE_P) + math.log(9))   # the det noun aux verb line
    assert nats == pytest.approx(expected)
    assert qf.entropy_rate(20_000, seed=0) == pytest.approx(1.0, abs=0.02)
