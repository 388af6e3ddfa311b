//! JSON Web Tokens: HS256, no leeway. Our tokens carry `sub`, `user_id`, `token_type`, `role`,
//! `iat`, `exp` and `jti`; a token carrying only what the original Django server put in
//! (`user_id`, `token_type`, `exp`) is accepted too and its role read from the account, so a
//! deployment that keeps its `SECRET_KEY` keeps its clients signed in. A refresh token is never
//! an access token, and `alg: none` or a tampered signature never verifies.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use sanjevani_engine::model::{Role, User, UserId};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which kind of token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Short-lived, for API calls and WebSockets.
    Access,
    /// Long-lived, only for `/token/refresh`.
    Refresh,
}

impl TokenType {
    fn as_str(self) -> &'static str {
        match self {
            TokenType::Access => "access",
            TokenType::Refresh => "refresh",
        }
    }
}

#[derive(Serialize)]
struct OutClaims<'a> {
    sub: String,
    user_id: UserId,
    token_type: &'a str,
    role: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

#[derive(Deserialize)]
struct InClaims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    user_id: Option<serde_json::Value>,
    token_type: String,
    #[serde(default)]
    role: Option<String>,
}

/// A verified token's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The account.
    pub user_id: UserId,
    /// The role the token names, if it names one (the original's tokens do not).
    pub role: Option<Role>,
}

/// Issues and verifies tokens with one secret.
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
}

impl Jwt {
    /// Keys from the shared secret.
    pub fn new(secret: &[u8], access_ttl: Duration, refresh_ttl: Duration) -> Jwt {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        Jwt {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl,
            refresh_ttl,
        }
    }

    /// Mints a token of `kind` for `user`.
    pub fn issue(&self, user: &User, kind: TokenType) -> String {
        let ttl = match kind {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        self.issue_for(user.id, user.role, kind, ttl)
    }

    /// Mints a token with an explicit lifetime (data generators mint long-lived load-test tokens).
    pub fn issue_for(&self, user_id: UserId, role: Role, kind: TokenType, ttl: Duration) -> String {
        let iat = now_secs();
        let claims = OutClaims {
            sub: user_id.to_string(),
            user_id,
            token_type: kind.as_str(),
            role: role.as_str(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: format!("{:032x}", rand::rng().random::<u128>()),
        };
        // HS256 over a serialisable struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).unwrap_or_default()
    }

    /// Verifies signature, expiry and kind; `None` for anything else.
    pub fn verify(&self, token: &str, kind: TokenType) -> Option<Verified> {
        let data = jsonwebtoken::decode::<InClaims>(token, &self.decoding, &self.validation).ok()?;
        let claims = data.claims;
        if claims.token_type != kind.as_str() {
            return None;
        }
        let user_id = claims.user_id.as_ref().or(claims.sub.as_ref()).and_then(as_id)?;
        let role = match claims.role {
            Some(r) => Some(Role::parse(&r)?),
            None => None,
        };
        Some(Verified { user_id, role })
    }
}

fn as_id(v: &serde_json::Value) -> Option<UserId> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            id: 42,
            email: "a@b.c".into(),
            password_hash: String::new(),
            name: "A".into(),
            phone_number: String::new(),
            role: Role::Pharmacy,
            email_verified: false,
            created_at: 0,
        }
    }

    fn jwt() -> Jwt {
        Jwt::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(300), Duration::from_secs(86400))
    }

    #[test]
    fn round_trip_and_kinds() {
        let jwt = jwt();
        let access = jwt.issue(&user(), TokenType::Access);
        let refresh = jwt.issue(&user(), TokenType::Refresh);
        assert_eq!(jwt.verify(&access, TokenType::Access), Some(Verified { user_id: 42, role: Some(Role::Pharmacy) }));
        assert_eq!(jwt.verify(&refresh, TokenType::Access), None);
        assert_eq!(jwt.verify(&access, TokenType::Refresh), None);
        assert!(jwt.verify(&refresh, TokenType::Refresh).is_some());
    }

    #[test]
    fn rejects_tampered_none_and_expired() {
        let jwt = jwt();
        let token = jwt.issue(&user(), TokenType::Access);
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = Jwt::new(b"another secret that is 32 bytes!!", Duration::from_secs(1), Duration::from_secs(1))
            .issue(&user(), TokenType::Access);
        let sig = other.split('.').nth(2).unwrap().to_string();
        parts[2] = &sig;
        assert_eq!(jwt.verify(&parts.join("."), TokenType::Access), None);
        // alg: none
        use base64_helpers::b64;
        let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), token.split('.').nth(1).unwrap());
        assert_eq!(jwt.verify(&none, TokenType::Access), None);
        let expired = jwt.issue_for(1, Role::Customer, TokenType::Access, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(jwt.verify(&expired, TokenType::Access), None);
    }

    #[test]
    fn accepts_the_original_claims() {
        #[derive(Serialize)]
        struct Original {
            token_type: &'static str,
            exp: u64,
            iat: u64,
            jti: &'static str,
            user_id: i64,
        }
        let secret = b"django-insecure-0123456789abcdef0123456789";
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Original { token_type: "access", exp: now_secs() + 60, iat: now_secs(), jti: "abc", user_id: 7 },
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        let jwt = Jwt::new(secret, Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(jwt.verify(&token, TokenType::Access), Some(Verified { user_id: 7, role: None }));
    }

    mod base64_helpers {
        pub fn b64(input: &[u8]) -> String {
            const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
                for i in 0..=chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
