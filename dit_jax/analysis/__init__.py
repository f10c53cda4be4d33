"""What a step costs: FLOPs, MFU against rated peaks, collective bytes moved, the state's split over chips,
a block's saved activations by remat policy."""
