//! Reading an OpenAI server-sent-event stream for what the replay records.

/// Reads the usage out of an OpenAI SSE stream, line by line.
#[derive(Debug, Default)]
pub struct SseUsage {
    partial: Vec<u8>,
    /// `data: [DONE]` seen.
    pub done: bool,
    /// Chunks with choices.
    pub content_chunks: u64,
    /// Reported prompt tokens.
    pub prompt_tokens: Option<u64>,
    /// Reported completion tokens.
    pub completion_tokens: Option<u64>,
    /// Reported cached prompt tokens.
    pub cached_tokens: Option<u64>,
}

impl SseUsage {
    /// Feeds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = self.partial[start..].iter().position(|&b| b == b'\n') {
            let line = &self.partial[start..start + nl];
            start += nl + 1;
            let Some(payload) = line.strip_prefix(b"data: ") else { continue };
            if payload == b"[DONE]" {
                self.done = true;
                continue;
            }
            if payload.windows(8).any(|w| w == b"\"usage\":") {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
                    let u = &v["usage"];
                    if u.is_object() {
                        self.prompt_tokens = u["prompt_tokens"].as_u64();
                        self.completion_tokens = u["completion_tokens"].as_u64();
                        self.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64();
                    }
                    if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                        self.content_chunks += 1;
                    }
                    continue;
                }
            }
            self.content_chunks += 1;
        }
        self.partial.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_across_frame_boundaries() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"tok tok \"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":900,\"completion_tokens\":2,",
            "\"prompt_tokens_details\":{\"cached_tokens\":832}}}\n\n",
            "data: [DONE]\n\n"
        );
        for split in [1, 7, 50, 101, stream.len() - 3] {
            let mut u = SseUsage::default();
            u.feed(&stream.as_bytes()[..split]);
            assert!(!u.done);
            u.feed(&stream.as_bytes()[split..]);
            assert!(u.done, "split {split}");
            assert_eq!(u.prompt_tokens, Some(900));
            assert_eq!(u.completion_tokens, Some(2));
            assert_eq!(u.cached_tokens, Some(832));
            assert_eq!(u.content_chunks, 2);
        }
    }
}
