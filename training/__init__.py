"""Offline trainer: ``python -m training --corpus FILE --out RUN_DIR`` (see __main__)."""
