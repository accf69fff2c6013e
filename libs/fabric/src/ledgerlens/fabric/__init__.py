"""ledgerlens-fabric: a Hyperledger Fabric Gateway client on the official protos."""
