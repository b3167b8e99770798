"""The encoders: SINE (`sine`, the paper's model and its folded serving graph) and the
single-vector SASRec baseline (`sasrec`), with the same inputs and outputs."""
