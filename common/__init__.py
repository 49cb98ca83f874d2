"""The code the stage scripts share: records, models, training machinery, answers, sources."""
