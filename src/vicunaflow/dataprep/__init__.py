"""Conversation data before tokenisation: sources, cleaning, splitting, as streams.

    data fetch   a file of a Hugging Face dataset repository at a pinned revision -> data/raw/<name>/
    data clean   HTML -> Markdown, roles normalised, broken/empty/duplicate/other-language conversations
                 dropped and counted by reason -> data/clean/<name>.jsonl (+ a TSV of the counts)
    data mix     several cleaned sets, each with a weight -> one set
    data split   conversations longer than N tokens cut at turn boundaries, a held-out fraction set
                 aside -> data/split/<name>/<model>-len<N>.jsonl, ready for `data tokenize`

Why a package beside data.py: `data tokenize` validates strictly and loads a file whole (it is small
once split); these steps read ShareGPT-sized dumps (~1 GB) as streams, record by record, in flat
memory, and drop what they cannot use instead of refusing the file. Every output is JSONL written to a
temporary and renamed into place (`records.atomic_writer`); the same input gives the same bytes.

Modules: `records` (reading JSON arrays and JSONL as streams, naming records, atomic writers, the
drop-count TSV), `clean`, `split`, `sources` (fetch and mix). Each verb's function comes first.
"""
