//! Tokens for the client API and the peer API, on every platform.

/// A fresh random token: 32 bytes from the OS-seeded CSPRNG, hex encoded.
pub fn random_token() -> String {
    use rand::Rng;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
