"""Compatibility names: the public API that used to live in this module, now split by concern.

New code imports from the modules themselves:

- `compodistill.data.scene_graph`: objects, scenes, vocabulary, sampling, held-out pairs, relations.
- `compodistill.data.render`: drawing scenes with Pillow.
- `compodistill.data.statements`: statements, the evaluator, sentence and caption texts and parsers.
- `compodistill.data.questions`: queries, answers, question texts and parser, VQA and conversation builders.
- `compodistill.data.negatives`: SugarCrepe-style CR pairs and relational-hallucination pairs.
"""
from .negatives import CR_SUBSETS, HALLUCINATION_CATEGORIES, cr_pair, hallucination_pair
from .questions import (QUESTION_CATEGORIES, HowMany, Query, WhatAttr, WhatRelated, YesNo, answer, answers,
                        conversation_turns, make_query, mentioned_combos, parse_question, question_text)
from .scene_graph import (BACKGROUND, DEFAULT_COLORS, DEFAULT_SHAPES, OPPOSITE, PALETTE, RELATIONS, SHAPES, SIZES,
                          Obj, Scene, Vocabulary, held_out_combos, make_scene, make_vocabulary, relation_truth,
                          sample_scene, true_relations)
from .statements import (ATTRIBUTES, CAPTION_REQUESTS, NUMBER_WORDS, RELATION_WORDS, And, Count, Desc, Exists,
                         HasAttr, Relation, Statement, caption_statements, caption_text, desc_text, evaluate, holds,
                         matching, noun_phrase, number_word, parse_caption, parse_statement, plural, shortest_unique,
                         statement_text, unique_descriptions)

__all__ = [
    "ATTRIBUTES", "And", "BACKGROUND", "CAPTION_REQUESTS", "CR_SUBSETS", "Count", "DEFAULT_COLORS", "DEFAULT_SHAPES",
    "Desc", "Exists", "HALLUCINATION_CATEGORIES", "HasAttr", "HowMany", "NUMBER_WORDS", "OPPOSITE", "Obj",
    "PALETTE", "QUESTION_CATEGORIES", "Query", "RELATIONS", "RELATION_WORDS", "Relation", "SHAPES", "SIZES",
    "Scene", "Statement", "Vocabulary", "WhatAttr", "WhatRelated", "YesNo", "answer", "answers", "caption_statements",
    "caption_text", "conversation_turns", "cr_pair", "desc_text", "evaluate", "hallucination_pair",
    "held_out_combos", "holds", "make_query", "make_scene", "make_vocabulary", "matching", "mentioned_combos",
    "noun_phrase", "number_word", "parse_caption", "parse_question", "parse_statement", "plural", "question_text",
    "relation_truth", "sample_scene", "shortest_unique", "statement_text", "true_relations", "unique_descriptions",
]
