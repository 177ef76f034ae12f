"""What the bot says on its own (in pt-BR, like its users' customers): the defaults of the reply settings.

Each can be replaced by its setting (FALLBACK_MESSAGE, NON_TEXT_REPLY, ...); see .env.webhook.example.
"""

DEFAULT_SYSTEM_PROMPT = (
    "You are the WhatsApp assistant of a business. Answer the customer's message "
    "helpfully, politely and briefly, in the same language the customer wrote in. "
    "Write plain text suitable for WhatsApp: short paragraphs, no Markdown tables or "
    "headings. If you do not know something about the business, say so honestly and "
    "offer to pass the question to a human."
)


DEFAULT_FALLBACK_MESSAGE = "Desculpe, não consegui responder agora. Por favor, tente novamente em alguns minutos."


DEFAULT_NON_TEXT_REPLY = "Por enquanto eu só entendo mensagens de texto. Pode me escrever sua pergunta?"


DEFAULT_RESET_REPLY = "Pronto! Comecei uma conversa nova. Como posso ajudar?"


DEFAULT_STOP_REPLY = (
    "Tudo bem, não vou mais responder automaticamente. Se quiser voltar a falar com o assistente, envie VOLTAR."
)


DEFAULT_START_REPLY = "Que bom ter você de volta! Como posso ajudar?"


DEFAULT_RATE_LIMIT_REPLY = (
    "Recebi muitas mensagens em pouco tempo. Vou pausar as respostas por alguns instantes; tente de novo em breve."
)


DEFAULT_OUT_OF_HOURS_NOTICE = (
    "Olá! Recebemos sua mensagem, mas estamos fora do horário de atendimento ({hours}). A equipe retorna {next_open}."
)


DEFAULT_MEDIA_UNSUPPORTED_REPLY = (
    "Recebi seu arquivo, mas ainda não consigo abrir esse tipo. Pode me mandar em texto, áudio, foto ou PDF?"
)


DEFAULT_MEDIA_UNAVAILABLE_REPLY = (
    "Não consegui abrir o arquivo que você mandou. Pode enviá-lo de novo ou escrever sua pergunta?"
)
