"""ledgerlens.runtime: the shared service runtime."""
