"""Multi-plane communication: the dispatch layout, expert-parallel dispatch/combine over torch.distributed, the EP
MoE layer, and the network topologies of the paper's Table 3 (counts, cost, explicit graphs at small radix)."""
