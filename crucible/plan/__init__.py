"""Planning arithmetic: parameters, FLOPs and hardware figures, each in one place."""
