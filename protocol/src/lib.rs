//! forge-protocol: wire types, framing and codecs (being built).
