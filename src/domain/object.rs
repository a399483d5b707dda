//! [`Object`]: a struct read only from a JSON object.
//!
//! serde's derived `Deserialize` for a struct with named fields also accepts a JSON array of the
//! field values in declaration order, so `["T", null, ["p"]]` would pass as a document and a
//! typo-proof API (unknown fields refused) would quietly take positional input. Wrapping the type
//! in `Object` refuses anything but an object, with serde's usual "invalid type" message.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// `T`, deserialized from a JSON object only.
#[derive(Debug, PartialEq)]
pub struct Object<T>(pub T);

impl<T> Object<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(Only(PhantomData)).map(Object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Point {
        x: i32,
        #[serde(default)]
        y: Option<i32>,
    }

    #[test]
    fn only_an_object_is_read() {
        let ok: Object<Point> = serde_json::from_str(r#"{"x": 1}"#).unwrap();
        assert_eq!(ok.into_inner(), Point { x: 1, y: None });
        // What the derived impl alone accepts:
        assert_eq!(serde_json::from_str::<Point>("[1, 2]").unwrap(), Point { x: 1, y: Some(2) });
        for bad in ["[1, 2]", "[1]", "1", "\"x\"", "null"] {
            let err = serde_json::from_str::<Object<Point>>(bad).unwrap_err();
            assert!(err.to_string().contains("expected a JSON object"), "{bad}: {err}");
        }
        assert!(serde_json::from_str::<Object<Point>>(r#"{"x": 1, "z": 2}"#).is_err(), "unknown fields still refused");
        let nested: Option<Object<Point>> = serde_json::from_str("null").unwrap();
        assert_eq!(nested, None);
    }
}
