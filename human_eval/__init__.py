"""Human evaluation of generated images (study.py): pairwise preference and patch-rating studies, a VLM judge, and
their statistics (PROTOCOL.md §12, docs/study.md)."""
