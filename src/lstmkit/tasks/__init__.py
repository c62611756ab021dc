"""Applications built on lstmkit.train and lstmkit.nn: data -> model -> fit/predict/evaluate."""
