"""The language model (`lm.RNNLM`) and its LSTM with three interchangeable backends (`lstm.LSTM`)."""
