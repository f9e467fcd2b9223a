"""Common Crawl cleaning: WARC to clean, deduplicated, mixed corpora.

Per-document stages are small pure functions ``Document -> Document | Drop``
(see ``document.py``); corpus-level stages (MinHash, exact substring, URL
dedup) work on whole shards. Runners only schedule them.
"""
