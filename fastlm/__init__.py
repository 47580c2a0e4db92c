"""fastlm: a fast LSTM language model toolkit."""
