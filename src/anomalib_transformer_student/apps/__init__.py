"""Jobs around the model: the ``transformer-student`` console script, the demo and its data, evaluation reports."""
