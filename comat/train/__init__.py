"""The trainer every fine-tuning method runs in (``comat train``)."""
