//! Reading a server-sent-event stream (OpenAI chat completions, Anthropic Messages, OpenAI
//! Responses) for what the replay records.

/// Reads the usage out of a streamed response, line by line.
#[derive(Debug, Default)]
pub struct SseUsage {
    partial: Vec<u8>,
    /// The stream's end seen (`data: [DONE]`, `message_stop`, the response's last event).
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
            if !contains(payload, b"\"choices\":") && contains(payload, b"\"type\":") {
                let payload = payload.to_vec();
                self.typed_event(&payload);
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

    /// An Anthropic or Responses event (an object with a `type`).
    fn typed_event(&mut self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { return };
        match v["type"].as_str() {
            Some("content_block_delta" | "response.output_text.delta") => self.content_chunks += 1,
            Some("message_stop") => self.done = true,
            Some("message_start") => {
                let u = &v["message"]["usage"];
                let cached = u["cache_read_input_tokens"].as_u64();
                self.cached_tokens = cached;
                self.prompt_tokens = u["input_tokens"].as_u64().map(|n| n + cached.unwrap_or(0));
            }
            Some("message_delta") => {
                self.completion_tokens = v["usage"]["output_tokens"].as_u64();
            }
            Some("response.completed" | "response.incomplete") => {
                let u = &v["response"]["usage"];
                self.prompt_tokens = u["input_tokens"].as_u64();
                self.cached_tokens = u["input_tokens_details"]["cached_tokens"].as_u64();
                self.completion_tokens = u["output_tokens"].as_u64();
                self.done = true;
            }
            Some("response.failed" | "error") => self.done = false,
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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

    #[test]
    fn anthropic_and_responses_streams_are_read() {
        let anthropic = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":",
            "{\"input_tokens\":68,\"cache_read_input_tokens\":832,\"output_tokens\":0}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut u = SseUsage::default();
        u.feed(anthropic.as_bytes());
        assert!(u.done);
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (Some(900), Some(832), Some(1))
        );
        assert_eq!(u.content_chunks, 1);

        let responses = concat!(
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":",
            "{\"input_tokens\":900,\"input_tokens_details\":{\"cached_tokens\":832},\"output_tokens\":1}}}\n\n",
        );
        let mut u = SseUsage::default();
        u.feed(responses.as_bytes());
        assert!(u.done);
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (Some(900), Some(832), Some(1))
        );
        assert_eq!(u.content_chunks, 1);
    }
}
